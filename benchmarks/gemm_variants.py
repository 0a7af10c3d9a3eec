"""How much could GEMM-level rewrites save? Times a model's per-layer matmuls as the step runs them
(separate q/k/v and gate/up projections, forward + input grad + weight grad) against the fused forms a
graph pass could produce (one qkv GEMM, one gate_up GEMM), and the lm_head weight grad in both
operand orders. Interleaved repetitions, medians; fp32 unless --dtype bf16.

    python benchmarks/gemm_variants.py --model small-llama
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from graphllm.models import PRESETS

SHAPES = {"tiny-llama": 4 * 256, "small-llama": 1 * 512}  # tokens per step, as in train_step.py


def linear_fwd_bwd(x, ws, g_outs):
    """Forward, input grad and weight grad of len(ws) linears sharing the input x [T, H]."""
    ys = [x @ w.t() for w in ws]  # [T, N_i]
    gx = sum(g @ w for g, w in zip(g_outs, ws))  # [T, H]
    gws = [g.t() @ x for g in g_outs]  # [N_i, H]
    return ys, gx, gws


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(PRESETS), default="small-llama")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)
    dt = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    cfg = PRESETS[args.model]()
    T, H, I, V = SHAPES[args.model], cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nq, nkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dt)

    x = r(T, H)
    case_ws = {"q,k,v": [r(nq, H), r(nkv, H), r(nkv, H)], "gate,up": [r(I, H), r(I, H)]}
    cases = {}
    for name, ws in case_ws.items():
        gs = [r(T, w.shape[0]) for w in ws]
        wf, gf = torch.cat(ws), torch.cat(gs, dim=1)  # fused weight [ΣN, H], fused grad [T, ΣN]
        cases[f"{name} separate"] = lambda ws=ws, gs=gs: linear_fwd_bwd(x, ws, gs)
        cases[f"{name} fused"] = lambda wf=wf, gf=gf: linear_fwd_bwd(x, [wf], [gf])
    h, glog = r(T, H), r(T, V)  # final hidden [T, H], grad of logits [T, V]
    cases["lm_head wgrad gᵀ·x → [V,H]"] = lambda: glog.t() @ h
    cases["lm_head wgrad (xᵀ·g)ᵀ → [H,V]"] = lambda: h.t() @ glog
    cases["lm_head wgrad (xᵀ·g)ᵀ contiguous"] = lambda: (h.t() @ glog).t().contiguous()
    times = {k: [] for k in cases}
    for f in cases.values():
        f()
    for _ in range(args.reps):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    console = Console(width=None if sys.stdout.isatty() else 120)
    t = Table(title=f"{args.model} {args.dtype}: T={T} H={H} I={I} V={V}, {torch.get_num_threads()} threads, "
                    f"median of {args.reps}")
    t.add_column("case")
    t.add_column("median ms", justify="right")
    for k, v in times.items():
        t.add_row(k, f"{1e3 * statistics.median(v):.2f}")
    console.print(t)


if __name__ == "__main__":
    main()
