"""`evaluate(scorer, EvalConfig)`: one benchmark run → the results dict (`graphllm eval` prints and saves it)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from graphllm.errors import GraphllmError
from graphllm.eval import humaneval, sandbox
from graphllm.eval.runner import (SubjectScore, Timer, group_scores, limited, results_dict, score_choices,
                                  score_generation)
from graphllm.eval.scorer import GraphScorer, Scorer
from graphllm.eval.tasks import CHOICE_TASKS, TASKS, load_task


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    task: Literal["mmlu", "ceval", "boolq", "bbh", "agieval", "humaneval"]
    data: Path | None = None
    """The benchmark's local folder (or HumanEval file); None only for humaneval (the bundled problems)."""
    shots: int = 0
    """Few-shot examples per prompt (from the dev/train split, or the first ones of the file)."""
    limit: int | None = None
    """Score at most this many documents per subject."""
    split: str | None = None
    """Split to score (mmlu: test|val, ceval: val, boolq: val); None: the task's default."""
    max_new_tokens: int | None = None
    """Generation budget (bbh: 256, humaneval: 512 by default)."""
    log_samples: bool = False
    """Keep each document's prediction in the results."""
    completions: Path | None = None
    """humaneval only: score these completions (jsonl of task_id, completion) instead of generating."""
    sandbox: humaneval.SandboxLimits | None = None
    workers: int | None = None
    """humaneval: programs run at once (default: CPU count, at most 8)."""
    allow_unsandboxed: bool = False
    """humaneval: where bubblewrap is not usable, run the generated programs without it (with a warning)
    instead of refusing: they then run as this user, contained only by rlimits and an audit hook."""


def evaluate(scorer: Scorer | None, cfg: EvalConfig) -> dict[str, Any]:
    """Run `cfg.task` with `scorer`; returns {"task", "config", "overall", "subjects", "seconds"}."""
    if cfg.task not in TASKS:
        raise GraphllmError(f"--task {cfg.task}: not one of {', '.join(TASKS)}")
    if cfg.shots < 0 or (cfg.limit is not None and cfg.limit < 1):
        raise GraphllmError(f"--shots must be ≥ 0 and --limit ≥ 1 (got {cfg.shots}, {cfg.limit})")
    if cfg.completions is not None and cfg.task != "humaneval":
        raise GraphllmError("--completions applies to --task humaneval only")
    if cfg.allow_unsandboxed and cfg.task != "humaneval":
        raise GraphllmError("--allow-unsandboxed-exec applies to --task humaneval only")
    with Timer() as t:
        if cfg.task == "humaneval":
            scores = [score_humaneval(scorer, cfg)]
        else:
            if cfg.data is None:
                raise GraphllmError(f"--task {cfg.task} needs --data DIR (the benchmark's local files)")
            subjects = limited(load_task(cfg.task, cfg.data, shots=cfg.shots, split=cfg.split), cfg.limit)
            if scorer is None:
                raise GraphllmError(f"--task {cfg.task} needs a model")
            if cfg.task in CHOICE_TASKS:
                scores = score_choices(scorer, subjects, cfg.shots)
            else:
                scores = score_generation(scorer, subjects, cfg.shots, **_budget(cfg))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("sandbox",)}
    if isinstance(scorer, GraphScorer):
        config.update(backend=scorer.backend, batch_size=scorer.batch_size, max_length=scorer.max_length,
                      graphs_compiled=sorted(list(k) for k in scorer.graphs),
                      scorer_stats={k: round(v, 3) for k, v in scorer.stats.items()})
        generator = getattr(scorer, "_static_generator", None)  # set by graphllm.generate.generate_until
        if generator is not None:
            config["generation_graphs_compiled"] = dict(generator.compile_counts)
    groups = None
    if cfg.task == "mmlu":
        from graphllm.eval.mmlu_categories import MMLU_CATEGORY

        groups = group_scores(scores, MMLU_CATEGORY)
    return results_dict(cfg.task, scores, config=config, seconds=t.seconds, log_samples=cfg.log_samples,
                        groups=groups)


def _budget(cfg: EvalConfig) -> dict[str, int]:
    return {"max_new_tokens": cfg.max_new_tokens} if cfg.max_new_tokens else {}


def score_humaneval(scorer: Scorer | None, cfg: EvalConfig) -> SubjectScore:
    """pass@1 over HumanEval: one greedy completion per problem (or the given completions, pass@1 by the
    unbiased estimator when a task has several)."""
    problems = humaneval.load_problems(cfg.data)[: cfg.limit]
    if cfg.shots:
        raise GraphllmError("--shots does not apply to humaneval (zero-shot: the prompt is the function header)")
    sandbox.require(cfg.allow_unsandboxed, warn=False)  # refuse before generating, not after
    by_id = {p["task_id"]: p for p in problems}
    if cfg.completions is not None:
        from graphllm.eval.formats import read_jsonl

        rows = [r for r in read_jsonl(cfg.completions, required=("task_id", "completion")) if r["task_id"] in by_id]
        pairs = [(r["task_id"], str(r["completion"])) for r in rows]
        if not pairs:
            raise GraphllmError(f"--completions {cfg.completions}: no completion for any of the {len(problems)} problems")
    else:
        if scorer is None:
            raise GraphllmError("--task humaneval needs a model or --completions FILE")
        budget = cfg.max_new_tokens or humaneval.MAX_NEW_TOKENS
        texts = scorer.generate_until([p["prompt"] for p in problems], list(humaneval.STOP), budget)
        pairs = [(p["task_id"], t) for p, t in zip(problems, texts)]
    results = humaneval.run_programs([humaneval.check_program(by_id[tid], c) for tid, c in pairs],
                                     cfg.sandbox or humaneval.SandboxLimits(), workers=cfg.workers,
                                     allow_unsandboxed=cfg.allow_unsandboxed)
    per_task: dict[str, list[bool]] = {}
    samples = []
    for (tid, completion), res in zip(pairs, results):
        per_task.setdefault(tid, []).append(res.passed)
        samples.append({"task_id": tid, "completion": completion, "status": res.status, "detail": res.detail})
    p1 = [humaneval.pass_at_k(len(v), sum(v), 1) for v in per_task.values()]
    return SubjectScore(name="humaneval", n=len(per_task), metrics={"pass@1": sum(p1) / len(p1)}, samples=samples)


def build_scorer(model: str, *, tokenizer: str | None = None, batch_size: int = 8, backend: str = "eager",
                 max_length: int | None = None, seed: int = 0, amp: str = "fp32",
                 prefix_token_id: int | None = None) -> GraphScorer:
    """A GraphScorer for a preset (random weights from `seed`, graphllm's built-in tokenizer) or an HF
    checkpoint directory (its own tokenizer); `tokenizer` overrides (a .model file or HF tokenizer dir);
    `prefix_token_id` overrides the token an empty context is (default: BOS, else EOS)."""
    from graphllm.backends import get_backend
    from graphllm.data.encoders import load_encoder, resolve_spec
    from graphllm.models import load_model

    get_backend(backend)  # fail fast on a bad backend name, before loading weights
    net = load_model(model)
    spec = tokenizer or ("builtin" if not os.path.isdir(model) else model)
    enc = load_encoder(resolve_spec(spec), name=spec)
    if enc.vocab_size > net.config.vocab_size:
        raise GraphllmError(f"tokenizer {spec} has {enc.vocab_size} tokens but {model} has vocab_size="
                            f"{net.config.vocab_size}; pass --tokenizer with the model's own tokenizer")
    return GraphScorer(net, enc, batch_size=batch_size, backend=backend, max_length=max_length, amp=amp,
                       prefix_token_id=prefix_token_id)
