"""CUDA smoke test: graphllm on one GPU, compared with the same run on the CPU.

    python benchmarks/cuda_smoke.py [--backend inductor|eager] [--steps 5] [--seq-len 128]

Compiles tiny-llama for `--device cuda` (graphllm.job.build, the path `graphllm compile/run` take), trains
`--steps` steps on fixed random batches, does the same on the CPU from the same seed, and prints per step both
losses, their relative difference, the step times, and the GPU's peak allocated memory. fp32 with TF32 off on
both sides, so the two runs differ only by reduction order. Exit 0: losses agree within LOSS_RTOL; 1: they do
not; 2: no CUDA device (nothing was run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

LOSS_RTOL = 1e-3
"""GPU vs CPU, fp32 without TF32, per step over 5 AdamW steps: reduction order differs (cuBLAS vs the CPU's
GEMM, fused kernels), ~1e-6 per op, compounded by the updates; a tensor on the wrong device or a missing
gradient moves the loss by far more."""


def batches(vocab: int, steps: int, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return out


def run(device: str, args: argparse.Namespace) -> dict:
    from graphllm.data.feed import to_device
    from graphllm.job import build
    from graphllm.plan import CompilePlan
    from graphllm.train import TrainConfig, train_steps

    plan = CompilePlan(model="tiny-llama", backend=args.backend, device=device, batch_size=args.batch_size,
                       seq_len=args.seq_len, seed=0)
    t0 = time.perf_counter()
    built = build(plan)
    compile_s = time.perf_counter() - t0
    data = batches(built.model.config.vocab_size, args.steps, args.batch_size, args.seq_len)
    cfg = TrainConfig(steps=args.steps, lr=1e-3, warmup_steps=1)
    records = list(train_steps(built.engine, lambda step: to_device(data[step], device), cfg))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"device": device, "compile_s": compile_s, "losses": [r["loss"] for r in records],
            "step_ms": [1e3 * r["step_time_s"] for r in records], "peak_cuda_bytes": peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["inductor", "eager"], default="inductor")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_smoke: no CUDA device (torch.cuda.is_available() is False); nothing run", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · backend {args.backend}")
    gpu, cpu = run("cuda", args), run("cpu", args)
    worst = 0.0
    for step, (a, b, ta, tb) in enumerate(zip(gpu["losses"], cpu["losses"], gpu["step_ms"], cpu["step_ms"]), 1):
        rel = abs(a - b) / abs(b)
        worst = max(worst, rel)
        print(f"step {step}: loss cuda {a:.6f} cpu {b:.6f} rel {rel:.1e} · {ta:,.1f} ms vs {tb:,.1f} ms")
    print(f"compile {gpu['compile_s']:.1f} s (cuda) / {cpu['compile_s']:.1f} s (cpu); peak CUDA memory "
          f"{gpu['peak_cuda_bytes'] / 2**20:,.1f} MiB; worst loss rel diff {worst:.1e} (tol {LOSS_RTOL:g}) "
          f"{'OK' if worst <= LOSS_RTOL else 'MISMATCH'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cuda": gpu, "cpu": cpu, "worst_rel": worst, "rtol": LOSS_RTOL}, f, indent=1)
    return 0 if worst <= LOSS_RTOL else 1


if __name__ == "__main__":
    sys.exit(main())
