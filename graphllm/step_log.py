"""What a logged training step says: the figures derived from a step record, and its console line.

Per logged step a Megatron user reads step/total, loss, lr, grad norm, step time, tokens/s for the global batch
and per rank, TFLOP/s per rank and MFU against the device's peak, peak memory and the wall-clock time.
`StepFigures(built)` adds to each step record (so the metrics file holds them too):
- `tokens_per_s_per_rank`: the global batch's tokens/s (`tokens_per_s`) ÷ the world size;
- `tflops_per_rank`: this rank's matmul FLOPs per step (its graphs' forward × 3 × micro-batches,
  graphllm.planning.flops) ÷ the step time, in TFLOP/s;
- `mfu`: that ÷ the device's peak (`device_peak`);
- `peak_memory_bytes`: the accelerator allocator's peak (cuda, npu), else the process's peak RSS;
- `time`: the wall-clock at the step's end (unix seconds).

`device_peak` is a square-matmul measurement made once per machine, device, dtype, thread count and torch
version and cached in `GRAPHLLM_CACHE/device_peak.json`: every run of one machine divides by the same number (a
per-run measurement on the shared 2-core CPU machine gave 47–66 GFLOP/s, moving MFU with the load). Delete the
file to measure again, e.g. after a hardware change that keeps the device's name.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

PEAK_SHAPE = 1024
"""Side of the square matmul whose rate is the device's peak (large enough to be compute-bound on a CPU core)."""
PEAK_REPS = 20
PEAK_FILE = "device_peak.json"


def measured_matmul_peak(dtype: torch.dtype = torch.float32, device: str = "cpu", reps: int = PEAK_REPS) -> float:
    """Median FLOP/s of a PEAK_SHAPE² linear on `device`, measured now."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PEAK_SHAPE, PEAK_SHAPE, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(PEAK_SHAPE, PEAK_SHAPE, generator=g).to(device=device, dtype=dtype)
    sync = torch.accelerator.synchronize if torch.device(device).type != "cpu" else (lambda: None)
    torch.nn.functional.linear(x, w)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * PEAK_SHAPE**3 / statistics.median(times)


def _device_name(device: str) -> str:
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    if kind != "cpu":
        return kind
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()} ×{os.cpu_count()}"


def peak_key(device: str, dtype: torch.dtype) -> str:
    """What a cached peak is valid for: the device's name, dtype, intra-op threads and torch's version."""
    return (f"{_device_name(device)}|{str(dtype).removeprefix('torch.')}|threads={torch.get_num_threads()}"
            f"|torch={torch.__version__}")


def device_peak(device: str, dtype: torch.dtype, cache_dir: str | Path | None = None) -> float:
    """The device's matmul peak in FLOP/s: cached (see the module docstring), measured on first use."""
    from graphllm.data.cache import atomic_write, cache_root

    file, key = Path(cache_dir or cache_root()) / PEAK_FILE, peak_key(device, dtype)
    try:
        known = json.loads(file.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    if isinstance(known.get(key), (int, float)) and known[key] > 0:
        return float(known[key])
    peak = measured_matmul_peak(dtype, device)
    try:  # atomic: ranks measuring at once each leave a whole file
        atomic_write(file, (json.dumps({**known, key: peak}, indent=1) + "\n").encode())
    except OSError:
        pass  # a read-only cache: measured again next run
    return peak


def peak_memory_bytes(device: str) -> int:
    """The accelerator allocator's peak on `device`, else this process's peak RSS."""
    kind = torch.device(device).type
    if kind == "cuda":
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    if kind == "npu":
        return int(torch.npu.max_memory_allocated())  # type: ignore[attr-defined]
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far: Linux VmHWM (the new address space's own
    high-water mark; getrusage's ru_maxrss in a subprocess starts at the parent's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def flops_per_step(built) -> int:
    """This rank's matmul FLOPs per optimizer step: its graphs' forward × 3 × micro-batches."""
    from graphllm.planning.flops import forward_flops

    runner = built.engine.pipeline
    if runner is not None:  # this rank's stage graphs only
        fwd = sum(forward_flops(m.stage) for m in runner.modules)
    else:
        fwd = forward_flops(built.result.model_graph)
    return 3 * fwd * built.plan.layout.micro_batches


class StepFigures:
    """Adds the derived figures (module docstring) to a step record."""

    def __init__(self, built) -> None:
        plan = built.plan
        self.device = plan.device
        self.world = plan.layout.world_size
        self.flops = flops_per_step(built)
        self.peak = device_peak(plan.device, torch.bfloat16 if plan.amp == "bf16" else torch.float32)

    def __call__(self, rec: dict[str, Any]) -> dict[str, Any]:
        rate = self.flops / rec["step_time_s"]
        return {**rec, "tokens_per_s_per_rank": rec["tokens_per_s"] / self.world, "tflops_per_rank": rate / 1e12,
                "mfu": rate / self.peak, "peak_memory_bytes": peak_memory_bytes(self.device), "time": time.time()}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def step_line(rec: dict[str, Any], total: int, extra: str = "") -> str:
    """One logged step on the console: `step 20/200 loss … lr … grad … 412 ms 1,243 tok/s (622/rank) …`;
    `extra`: the task's metrics and the latest validation, already formatted."""
    parts = [f"step {rec['step']:>{len(str(total))}}/{total}", f"loss {rec['loss']:.4f}", extra,
             f"lr {rec['lr']:.2e}", f"grad {rec['grad_norm']:.3g}", f"{rec['step_time_s'] * 1e3:,.0f} ms",
             f"{rec['tokens_per_s']:,.0f} tok/s"]
    if "tokens_per_s_per_rank" in rec:
        parts[-1] += f" ({rec['tokens_per_s_per_rank']:,.0f}/rank)"
        parts += [f"{rec['tflops_per_rank']:.3g} TFLOP/s/rank", f"MFU {100 * rec['mfu']:.1f}%",
                  f"mem {_size(rec['peak_memory_bytes'])}",
                  time.strftime("%H:%M:%S", time.localtime(rec["time"]))]
    return " ".join(p for p in parts if p)


def dir_bytes(path: str | Path) -> int:
    """Bytes of the files under `path` (a checkpoint directory)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
