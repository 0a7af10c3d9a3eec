"""LoRA training-step benchmark: graphllm LoRA vs graphllm full fine-tuning vs PEFT LoRA on HF eager.

One step = zero_grad + forward + loss + backward + fused AdamW step, on the same config, base weights, data and
dtype for every contender; the LoRA contenders have rank-`--rank` adapters (alpha `--alpha`) on every decoder
linear (q k v o gate up down) with the base frozen, as PEFT's `get_peft_model` sets them up. Contenders are
interleaved round-robin in this one process (train_step.py's method and helpers): a first (compiling) step each,
warm-up, then `--rounds` rounds of `--steps-per-round` steps each, rotated every round; figures are medians over
the steady steps, ratios also per round. Peak memory is measured per contender in a fresh subprocess.

    python benchmarks/lora_step.py --model small-llama --json runs/lora.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, `train_step` when run as a script
from common import (adapter_parser, current_rss_bytes, fmt_mib, median, peak_rss_bytes,  # noqa: E402
                    round_ratios, run_adapter_benchmark, run_rounds, timed)
from train_step import SHAPES, Contender, hf_adamw, hf_loss_fn, hf_model_like, make_batches  # noqa: E402

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from graphllm.models import PRESETS, load_model  # noqa: E402
from graphllm.planning.lora_config import DEFAULT_TARGETS  # noqa: E402
from graphllm.train import TrainConfig, decay_groups  # noqa: E402

CONTENDERS = ("graphllm-lora", "graphllm-full", "peft-eager")
LABELS = {"graphllm-lora": "graphllm LoRA (inductor)", "graphllm-full": "graphllm full FT (inductor)",
          "peft-eager": "PEFT LoRA, HF eager (sdpa)"}
LOSS_RTOL = 1e-4
"""First-step loss agreement (B = 0, so every contender computes the base model's loss): fp32 reduction order
and fusion only (~1e-6 seen); 1e-4 leaves room for a 32k-vocab logsumexp (train_step.py's fp32 tolerance)."""


def build(name: str, source: torch.nn.Module, example, args: argparse.Namespace) -> Contender:
    tc = TrainConfig()
    if name.startswith("graphllm"):
        from graphllm.compile import compile_pipeline
        from graphllm.pass_pipeline import build_pipeline
        from graphllm.plan import CompilePlan
        from graphllm.planning.lora_config import LoraConfig

        lora = LoraConfig(rank=args.rank, alpha=args.alpha) if name == "graphllm-lora" else LoraConfig()
        plan = CompilePlan(model=args.model, batch_size=example[0].shape[0], seq_len=example[0].shape[1],
                           backend="inductor", lora=lora)
        model = copy.deepcopy(source)
        compiled, dt = timed(lambda: compile_pipeline(model, example, build_pipeline(plan)))
        params = compiled.result.model_graph.parameters()  # the graph's: adapters included, base frozen
        opt = torch.optim.AdamW(decay_groups(params, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                eps=tc.eps, fused=True)
        return Contender(name, model, compiled, opt, dt, compiled=compiled)
    import peft

    hf = peft.get_peft_model(hf_model_like(source), peft.LoraConfig(r=args.rank, lora_alpha=args.alpha,
                                                                    target_modules=list(DEFAULT_TARGETS)))
    return Contender(name, hf, hf_loss_fn(hf, "fp32"), hf_adamw(hf, tc), 0.0)


def trainable(c: Contender) -> int:
    params = c.compiled.result.model_graph.parameters() if c.compiled is not None else c.module.parameters()
    return sum(p.numel() for p in params if p.requires_grad)


def bench(args: argparse.Namespace, console: Console) -> dict:
    source = load_model(args.model, seed=args.seed)
    batches = make_batches(source.config.vocab_size, args.batch, args.seq, args.seed)
    contenders = {n: build(n, source, batches[0], args) for n in CONTENDERS}
    console.print(f"[bold]{args.model}[/]: batch {args.batch} × seq {args.seq}, rank {args.rank}, alpha {args.alpha:g}, "
                  f"{torch.get_num_threads()} threads; compiling (first steps)…")
    steady = run_rounds(contenders, batches, args)
    med = {n: median([s["total"] for s in st]) for n, st in steady.items()}
    first = {n: c.steps[0]["loss"] for n, c in contenders.items()}
    rows = {n: {"median_step_s": med[n], "tokens_per_s": args.batch * args.seq / med[n],
                "vs_peft_eager": med["peft-eager"] / med[n],
                "vs_peft_eager_rounds": round_ratios(steady, "peft-eager", n, args.rounds),
                "vs_graphllm_full": med["graphllm-full"] / med[n],
                "vs_graphllm_full_rounds": round_ratios(steady, "graphllm-full", n, args.rounds),
                "split_s": {k: median([s[k] for s in steady[n]]) for k in ("fwd", "bwd", "opt")},
                "compile_s": c.prepare_s + c.steps[0]["total"] - med[n], "first_loss": first[n],
                "trainable_params": trainable(c), "step_times_s": [s["total"] for s in steady[n]]}
            for n, c in contenders.items()}
    worst = max(abs(v - first["peft-eager"]) / abs(first["peft-eager"]) for v in first.values())
    return {"model": args.model, "batch": args.batch, "seq": args.seq, "rank": args.rank, "alpha": args.alpha,
            "threads": torch.get_num_threads(), "rounds": args.rounds, "steps_per_round": args.steps_per_round,
            "loss_check": {"worst_rel": worst, "rtol": LOSS_RTOL, "ok": worst <= LOSS_RTOL}, "contenders": rows}


def rss_child(args: argparse.Namespace) -> None:
    source = load_model(args.model, seed=args.seed)
    batches = make_batches(source.config.vocab_size, args.batch, args.seq, args.seed)
    gc.collect()
    before = current_rss_bytes()
    c = build(args.rss_child, source, batches[0], args)
    for _ in range(3):
        c.step(batches, "rss")
    print(json.dumps({"peak_delta": peak_rss_bytes() - before, "steady_delta": current_rss_bytes() - before}))


def report(res: dict, console: Console) -> None:
    t = Table(title=f"LoRA train step — {res['model']} fp32, batch {res['batch']} × seq {res['seq']}, rank "
                    f"{res['rank']}, medians over {res['rounds']} rounds × {res['steps_per_round']} steps")
    for col in ("contender", "trainable", "median step", "tokens/s", "× PEFT eager (rounds)", "× graphllm full (rounds)",
                "fwd / bwd / opt", "compile", "peak RSS Δ", "RSS Δ after"):
        t.add_column(col, justify="left" if col == "contender" else "right")
    for n, r in res["contenders"].items():
        sp, m = r["split_s"], res.get("rss", {}).get(n, {})

        def ratio(key: str, r: dict = r) -> str:
            return f"{r[key]:.2f}× ({min(r[key + '_rounds']):.2f}–{max(r[key + '_rounds']):.2f})"
        t.add_row(LABELS[n], f"{r['trainable_params'] / 1e6:.2f}M", f"{r['median_step_s']:.3f} s",
                  f"{r['tokens_per_s']:,.0f}", ratio("vs_peft_eager"), ratio("vs_graphllm_full"),
                  f"{sp['fwd']:.3f} / {sp['bwd']:.3f} / {sp['opt']:.3f} s", f"{r['compile_s']:.1f} s",
                  fmt_mib(m["peak_delta"]) if "peak_delta" in m else m.get("error", "-"),
                  fmt_mib(m["steady_delta"]) if "steady_delta" in m else "-")
    console.print(t)
    lc = res["loss_check"]
    console.print(f"first-step loss (B = 0: the base model's), worst rel diff vs PEFT {lc['worst_rel']:.1e} "
                  f"(tol {lc['rtol']:.0e}) {'[green]OK[/]' if lc['ok'] else '[red]MISMATCH[/]'}; ratios: the other "
                  "side's median step / this one's (>1 = this one is faster); RSS Δ: each contender alone in a fresh "
                  "subprocess (peak VmHWM incl. compile, and after 3 steps), minus its RSS before building.")


def main(argv: list[str] | None = None) -> None:
    parser = adapter_parser(__doc__.split("\n\n")[0], presets=PRESETS, rounds=5, warmup=2, contenders=CONTENDERS)
    run_adapter_benchmark(parser.parse_args(argv), SHAPES, script=__file__, bench=bench, report=report,
                          rss_child=rss_child, contenders=CONTENDERS, width=150)


if __name__ == "__main__":
    main()
