"""QLoRA vs LoRA: memory and step time of graphllm's two adapter set-ups on the same model and data.

Both contenders train rank-`--rank` adapters on every decoder linear (q k v o gate up down) with the base frozen and
are compiled with inductor; QLoRA keeps those base weights in NF4 (passes/quantize_base.py) and dequantises each
where it is read, in the forward and again in the backward (it is never saved). One step = zero_grad + forward +
loss + backward + fused AdamW (train_step.py's method and helpers). Contenders are interleaved round-robin in this
process: a first (compiling) step each, warm-up, then `--rounds` rounds of `--steps-per-round` steps, rotated
every round; times are medians over the steady steps, ratios also per round.

Memory, per contender:
- base bytes / parameter: what holds the adapted linears' frozen weights (fp32 Parameters, or the NF4 buffers);
- graph tensors: every distinct storage the compiled graph reads (parameters and buffers: weights, adapters, NF4);
- saved activations: bytes the forward graph hands to the backward (planning.memory.saved_activation_bytes);
- RSS: each contender alone in a fresh subprocess, its peak (VmHWM, compile included: QLoRA quantises from the
  loaded fp32 model, so its peak holds that model once) and its RSS after 3 steps (freed heap trimmed), minus the
  RSS before loading.

    python benchmarks/qlora_memory.py --model small-llama --json runs/qlora_memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, `train_step` when run as a script
from common import (adapter_parser, current_rss_bytes, ensure_inductor_cache, fmt_mib, median,  # noqa: E402
                    peak_rss_bytes, round_ratios, run_adapter_benchmark, run_rounds, timed)

CACHE_DIR, CACHE_WARM = ensure_inductor_cache()  # before torch reads its inductor config

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from graphllm.models import PRESETS, load_model  # noqa: E402
from graphllm.planning.lora_config import DEFAULT_TARGETS  # noqa: E402
from graphllm.train import TrainConfig, decay_groups  # noqa: E402
from train_step import SHAPES, Contender, make_batches  # noqa: E402

CONTENDERS = ("lora", "qlora")
LABELS = {"lora": "graphllm LoRA (fp32 base)", "qlora": "graphllm QLoRA (NF4 base)"}
LOSS_RTOL = 1e-2
"""First-step loss, QLoRA vs LoRA (B = 0: the base model's loss, with and without NF4 rounding of the base): NF4
moves a random-init model's loss by ~1e-4 relative; a broken dequantisation moves it by O(1)."""


def build(name: str, model: torch.nn.Module, example, args: argparse.Namespace) -> Contender:
    from graphllm.compile import compile_pipeline
    from graphllm.pass_pipeline import build_pipeline
    from graphllm.plan import CompilePlan
    from graphllm.planning.lora_config import LoraConfig

    tc = TrainConfig()
    plan = CompilePlan(model=args.model, batch_size=example[0].shape[0], seq_len=example[0].shape[1],
                       backend="inductor", lora=LoraConfig(rank=args.rank, alpha=args.alpha, qlora=name == "qlora"))
    pipeline = build_pipeline(plan)  # lists lora, and quantize_base for qlora
    compiled, dt = timed(lambda: compile_pipeline(model, example, pipeline))
    params = compiled.result.model_graph.parameters()  # the graph's: adapters included, base frozen
    opt = torch.optim.AdamW(decay_groups(params, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                            fused=True)
    return Contender(name, model, compiled, opt, dt, compiled=compiled)


def memory(c: Contender) -> dict:
    """Bytes held by the adapted linears' base, by the whole model graph, and saved for the backward."""
    from graphllm.passes.lora import matches, module_path
    from graphllm.planning.memory import saved_activation_bytes

    gm = c.compiled.result.model_graph
    tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    nf4 = {n: t for n, t in tensors.items() if "_nf4_" in n}
    base = {n: t for n, t in tensors.items() if t.dim() == 2 and ".lora_" not in n and n.endswith(".weight")
            and matches(module_path(n), DEFAULT_TARGETS)}
    base_params = sum(t.numel() for t in base.values()) + sum(t.numel() * 2 for n, t in nf4.items()
                                                               if n.endswith("_nf4_codes"))
    base_bytes = sum(t.nbytes for t in base.values()) + sum(t.nbytes for t in nf4.values())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()}
    return {"base_params": base_params, "base_bytes": base_bytes, "base_bytes_per_param": base_bytes / base_params,
            "model_bytes": sum(storages.values()),
            "saved_activation_bytes": saved_activation_bytes(c.compiled.result.train_stage.graphs["backward"])}


def bench(args: argparse.Namespace, console: Console) -> dict:
    torch.manual_seed(args.seed)
    cfg = PRESETS[args.model]()
    batches = make_batches(cfg.vocab_size, args.batch, args.seq, args.seed)
    contenders = {n: build(n, load_model(args.model, seed=args.seed), batches[0], args) for n in CONTENDERS}
    console.print(f"[bold]{args.model}[/]: batch {args.batch} × seq {args.seq}, rank {args.rank}, {torch.get_num_threads()}"
                  f" threads, inductor cache {'warm' if CACHE_WARM else 'empty'}; compiling (first steps)…")
    steady = run_rounds(contenders, batches, args)
    med = {n: median([s["total"] for s in st]) for n, st in steady.items()}
    per_round = round_ratios(steady, "qlora", "lora", args.rounds)
    first = {n: c.steps[0]["loss"] for n, c in contenders.items()}
    rows = {n: {"median_step_s": med[n], "tokens_per_s": args.batch * args.seq / med[n],
                "split_s": {k: median([s[k] for s in steady[n]]) for k in ("fwd", "bwd", "opt")},
                "compile_s": c.prepare_s + c.steps[0]["total"] - med[n], "first_loss": first[n], **memory(c),
                "step_times_s": [s["total"] for s in steady[n]]} for n, c in contenders.items()}
    drift = abs(first["qlora"] - first["lora"]) / abs(first["lora"])
    return {"model": args.model, "batch": args.batch, "seq": args.seq, "rank": args.rank, "alpha": args.alpha,
            "threads": torch.get_num_threads(), "rounds": args.rounds, "steps_per_round": args.steps_per_round,
            "qlora_over_lora_step": med["qlora"] / med["lora"], "qlora_over_lora_rounds": per_round,
            "loss_check": {"rel": drift, "rtol": LOSS_RTOL, "ok": drift <= LOSS_RTOL}, "contenders": rows}


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc): freed weights otherwise stay in the RSS of a process whose
    malloc keeps them for reuse, and the figure would show what was ever allocated, not what is held."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_child(args: argparse.Namespace) -> None:
    batches = make_batches(PRESETS[args.model]().vocab_size, args.batch, args.seq, args.seed)
    gc.collect()
    before = current_rss_bytes()
    c = build(args.rss_child, load_model(args.model, seed=args.seed), batches[0], args)
    for _ in range(3):
        c.step(batches, "rss")
    gc.collect()
    _malloc_trim()
    print(json.dumps({"peak_delta": peak_rss_bytes() - before, "steady_delta": current_rss_bytes() - before}))


def report(res: dict, console: Console) -> None:
    t = Table(title=f"QLoRA vs LoRA — {res['model']} fp32, batch {res['batch']} × seq {res['seq']}, rank {res['rank']},"
                    f" inductor, medians over {res['rounds']} rounds × {res['steps_per_round']} steps")
    for col in ("contender", "median step", "tokens/s", "fwd / bwd / opt", "compile", "base B/param", "graph tensors",
                "saved activations", "peak RSS Δ", "RSS Δ after 3 steps"):
        t.add_column(col, justify="left" if col == "contender" else "right")
    for n, r in res["contenders"].items():
        sp, m = r["split_s"], res.get("rss", {}).get(n, {})
        t.add_row(LABELS[n], f"{r['median_step_s']:.3f} s", f"{r['tokens_per_s']:,.0f}",
                  f"{sp['fwd']:.3f} / {sp['bwd']:.3f} / {sp['opt']:.3f} s", f"{r['compile_s']:.1f} s",
                  f"{r['base_bytes_per_param']:.3f}", fmt_mib(r["model_bytes"]), fmt_mib(r["saved_activation_bytes"]),
                  fmt_mib(m["peak_delta"]) if "peak_delta" in m else m.get("error", "-"),
                  fmt_mib(m["steady_delta"]) if "steady_delta" in m else "-")
    console.print(t)
    lc, rounds = res["loss_check"], res["qlora_over_lora_rounds"]
    console.print(f"QLoRA step / LoRA step: {res['qlora_over_lora_step']:.2f}× (rounds {min(rounds):.2f}–"
                  f"{max(rounds):.2f}); first-step loss (B = 0) QLoRA vs LoRA rel diff {lc['rel']:.1e} (NF4 rounding; "
                  f"tol {lc['rtol']:.0e}) {'[green]OK[/]' if lc['ok'] else '[red]MISMATCH[/]'}")


def main(argv: list[str] | None = None) -> None:
    parser = adapter_parser(__doc__.split("\n\n")[0], presets=PRESETS, rounds=3, warmup=1, contenders=CONTENDERS)
    run_adapter_benchmark(parser.parse_args(argv), SHAPES, script=__file__, bench=bench, report=report,
                          rss_child=rss_child, contenders=CONTENDERS, width=170)


if __name__ == "__main__":
    main()
