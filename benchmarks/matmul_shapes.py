"""Why graphllm::grouped_matmul rounds its groups to whole row buckets on the CPU in bf16 (ops/grouped_matmul.py).

A CPU matmul in bf16 or fp16 runs in oneDNN, which compiles a kernel for each new shape and caches it; fp32 runs
in a BLAS without that cost. An expert's row count changes every step, so this times 200 matmuls [M, K] × [K, N]
at a fixed M, then at an M drawn from LOW..HIGH each call, then the fixed M again, in each dtype; and the
grouped matmul itself, with its buckets and with one row per bucket (each group's exact row count), over groups
whose sizes change each call (each at a width of its own, so it starts with no cached kernel). Each figure is a
mean over the calls.

    python benchmarks/matmul_shapes.py [--k 256] [--n 512] [--calls 200]
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

import graphllm.ops  # noqa: F401 - registers the ops

gm = sys.modules["graphllm.ops.grouped_matmul"]  # the module: the package exports the op under its name

LOW, HIGH = 150, 400  # rows per expert: the tiny models' 256 on average (benchmarks/moe_step.py)


def _per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - start) / calls * 1e6


def plain(dtype: torch.dtype, k: int, n: int, calls: int, rng: random.Random) -> str:
    x, w = torch.randn(HIGH, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    rows = [rng.randint(LOW, HIGH) for _ in range(calls)]
    fixed = _per_call_us(lambda i: torch.matmul(x[:256], w.t()), calls)
    varying = _per_call_us(lambda i: torch.matmul(x[:rows[i]], w.t()), calls)
    again = _per_call_us(lambda i: torch.matmul(x[:256], w.t()), calls)
    return f"matmul {dtype}: fixed M {fixed:,.0f} µs, varying M {varying:,.0f} µs, fixed again {again:,.0f} µs"


def grouped(bucket: int, k: int, n: int, calls: int, rng: random.Random, groups: int = 8) -> float:
    x = torch.randn(groups * HIGH, k, dtype=torch.bfloat16)
    w = torch.randn(groups, n, k, dtype=torch.bfloat16)
    sizes = [torch.tensor([rng.randint(LOW, HIGH) for _ in range(groups)]) for _ in range(calls)]
    saved, gm.ROW_BUCKET = gm.ROW_BUCKET, bucket
    try:
        return _per_call_us(lambda i: torch.ops.graphllm.grouped_matmul(x, w, sizes[i], True), calls) / groups
    finally:
        gm.ROW_BUCKET = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    rng = random.Random(0)
    for dtype in (torch.bfloat16, torch.float32):
        print(plain(dtype, args.k, args.n, args.calls, rng))
    for i, bucket in enumerate((1, gm.ROW_BUCKET)):
        n = args.n + 32 * (i + 1)  # a width of its own, so no run finds kernels another one compiled
        us = grouped(bucket, args.k, n, args.calls, rng)
        print(f"grouped_matmul bf16 [*, {args.k}] × [{args.k}, {n}], {bucket}-row buckets: {us:,.0f} µs per group")


if __name__ == "__main__":
    main()
