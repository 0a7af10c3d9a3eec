"""Activation offload (`--offload-activations`) side by side: saved bytes kept on the device vs moved to the
host, peak memory of a step, and median step time, against no offload.

One step = forward + loss + backward (no optimizer: offload changes neither). Each policy compiles its own copy
of the same model (same seed, same batch); the policies run interleaved round-robin in this one process after a
compiling step and a warm-up step each, and the table reports medians. Peak memory of a step is its growth over
the memory held before it:
- cuda: `torch.cuda.max_memory_allocated` (device memory: where the saving applies);
- cpu: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs before each step, with
  glibc's mmap threshold fixed so that freed tensors leave the resident set). Host and device are the same
  memory here: offload copies values within it, so no saving is expected — the cpu rows measure the copies' cost.

    python benchmarks/activation_offload.py --model tiny-llama --seq-len 256 --batch-size 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script
from common import ensure_inductor_cache, fmt_mib, interleave, median  # noqa: E402

POLICIES = {
    "none": {},
    "attention": {"activations": "attention"},
    "all": {"activations": "all"},
    "all budget 0.5": {"activations": "all", "budget": 0.5},
}
MMAP_THRESHOLD = "65536"
"""glibc: allocations of 64 KiB and more are mmapped and unmapped when freed, so the resident set follows the
live tensors (the default threshold grows after frees and keeps freed tensors resident)."""


def _hwm_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current resident set


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def step_peak(fn, device: str) -> tuple[float, int]:
    """(seconds, peak bytes above what was held before) of one call of `fn`."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        _hwm_reset()
        before = _status("VmRSS")
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status("VmHWM")
    return seconds, peak - before


def build(name: str, args, ids, labels):
    import graphllm
    from graphllm.compile import compile_pipeline, plan_for
    from graphllm.pass_pipeline import build_pipeline
    from graphllm.planning.offload_config import ActivationOffloadConfig

    model = graphllm.load_model(args.model, seed=0).to(args.device)
    plan = dataclasses.replace(plan_for(model, (ids, labels), backend=args.backend),
                               activation_offload=ActivationOffloadConfig(**POLICIES[name]))
    compiled = compile_pipeline(model, (ids, labels), build_pipeline(plan))

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = compiled(ids, labels)
        loss.backward()
        return loss.detach()

    return step, compiled.result.train_stage.graphs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated names from the table")
    args = ap.parse_args()
    if args.device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD  # read by glibc at start: run again with it
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.backend == "inductor":
        ensure_inductor_cache()
    from graphllm.offload_activations import offloaded_bytes
    from graphllm.planning.memory import saved_activation_bytes

    names = [n for n in args.policies.split(",") if n]
    g = torch.Generator().manual_seed(1)
    vocab = 8000 if args.model == "tiny-llama" else None
    runs, saved, moved, losses = {}, {}, {}, {}
    for name in names:
        if name == names[0]:
            import graphllm

            vocab = vocab or graphllm.load_model(args.model, seed=0).config.vocab_size
            ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(args.device)
            labels = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(args.device)
        step, graphs = build(name, args, ids, labels)
        t0 = time.perf_counter()
        losses[name] = step()
        print(f"compiled {name}: first step {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        step()  # warm-up
        saved[name] = saved_activation_bytes(graphs["backward"], graphs["forward"])
        moved[name] = offloaded_bytes(graphs["backward"])
        runs[name] = step
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, list[int]] = {n: [] for n in names}
    for order in interleave(names, args.rounds):
        for name in order:
            seconds, peak = step_peak(runs[name], args.device)
            times[name].append(seconds)
            peaks[name].append(peak)
    base_t, base_p = median(times[names[0]]), median(peaks[names[0]])
    print(f"\n{args.model}, batch {args.batch_size}, seq {args.seq_len}, backend {args.backend}, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved steps")
    print(f"| policy | saved activations | of which offloaded | peak memory of a step | vs {names[0]} | "
          f"median step (fwd+bwd) | vs {names[0]} | loss equal |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for n in names:
        t, p = median(times[n]), median(peaks[n])
        print(f"| {n} | {fmt_mib(saved[n])} | {fmt_mib(moved[n])} | {fmt_mib(p)} | {p / max(base_p, 1):.2f}x | "
              f"{t * 1e3:.0f} ms | {t / base_t:.2f}x | {torch.equal(losses[n], losses[names[0]])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
