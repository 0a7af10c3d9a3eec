"""Shared benchmark helpers: inductor cache, medians, interleaved rounds, matmul peak probes, RSS.

The benchmarks run on small shared CPU machines, so every number is a median over repeated samples,
contenders are interleaved round-robin in one process (noise from other processes hits all of them
alike), and the matmul peak is probed inside the same rounds so "fraction of peak" compares figures
taken under the same load.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence

DEFAULT_INDUCTOR_CACHE = "~/.cache/graphllm/inductor"


def ensure_inductor_cache() -> tuple[Path, bool]:
    """Point TORCHINDUCTOR_CACHE_DIR at a persistent directory (unless the user set one).

    Must run before inductor reads its config (i.e. before the first compile). Returns the directory
    and whether it already held entries (a warm cache makes compile times much shorter).
    """
    path = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser(DEFAULT_INDUCTOR_CACHE)))
    warm = path.is_dir() and any(path.iterdir())
    path.mkdir(parents=True, exist_ok=True)
    return path, warm


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def interleave(names: Sequence[str], rounds: int) -> list[list[str]]:
    """Round-robin order for each round, rotated by one each round so no contender always runs first
    (e.g. right after a matmul probe or right after another contender warmed the caches)."""
    n = len(names)
    return [[names[(r + i) % n] for i in range(n)] for r in range(rounds)]


@dataclass
class MatmulProbe:
    """Times `x @ w.T` for one shape and dtype; `flops` per call = 2·m·k·n."""

    label: str
    m: int
    k: int
    n: int
    dtype: object
    times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        self._x = torch.randn(self.m, self.k, generator=g).to(self.dtype)  # [m, k]
        self._w = torch.randn(self.n, self.k, generator=g).to(self.dtype)  # [n, k] (nn.Linear layout)
        self._f = torch.nn.functional.linear
        self._f(self._x, self._w)  # first call: allocator and library setup, not timed

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n

    def run(self, reps: int) -> None:
        for _ in range(reps):
            t0 = time.perf_counter()
            self._f(self._x, self._w)
            self.times.append(time.perf_counter() - t0)

    @property
    def median_flops_per_s(self) -> float:
        return self.flops / median(self.times)


def run_rounds(contenders: dict, batches, args) -> dict[str, list[dict]]:
    """Each contender's first (compiling) step and `args.warmup` warm-up steps, then `args.rounds` rounds of
    `args.steps_per_round` steps in rotated order (`interleave`); returns each contender's steady steps."""
    names = list(contenders)
    for name in names:
        contenders[name].step(batches, "first")
    for _ in range(args.warmup):
        for name in names:
            contenders[name].step(batches, "warmup")
    for r, order in enumerate(interleave(names, args.rounds)):
        for name in order:
            for _ in range(args.steps_per_round):
                contenders[name].step(batches, f"round{r}")
    return {n: [s for s in c.steps if s["tag"].startswith("round")] for n, c in contenders.items()}


def round_ratios(steady: dict[str, list[dict]], num: str, den: str, rounds: int) -> list[float]:
    """Per round: `num`'s median step time over `den`'s (the spread of a ratio on a noisy machine)."""
    def med(name: str, r: int) -> float:
        return median([s["total"] for s in steady[name] if s["tag"] == f"round{r}"])
    return [med(num, r) / med(den, r) for r in range(rounds)]


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc/self/statm, second field, in pages)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (graphllm.step_log.peak_rss_bytes: VmHWM, because
    ru_maxrss of a per-contender subprocess starts at the parent's peak)."""
    from graphllm.step_log import peak_rss_bytes as peak

    return peak()


def ru_maxrss_bytes() -> int:
    """getrusage(RUSAGE_SELF).ru_maxrss (KiB on Linux), for reference next to `peak_rss_bytes`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Stopwatch:
    """Laps of one step: call `lap(name)` after each part; `total` is the sum."""

    laps: dict[str, float] = field(default_factory=dict)
    _t: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._t
        self._t = now

    @property
    def total(self) -> float:
        return sum(self.laps.values())


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def fmt_rate(x: float, unit: str = "FLOP/s") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def fmt_mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


# -- the adapter benchmarks' shared driver (lora_step.py, qlora_memory.py) --------------------------------
def adapter_parser(description: str, *, presets, rounds: int, warmup: int, contenders):
    """The flags both adapter benchmarks take: model, shape, LoRA rank/alpha, rounds, RSS subprocesses, JSON."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", choices=sorted(presets), default="small-llama")
    p.add_argument("--batch", type=int, default=None, help="default: train_step.py's shape for the model")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-rss", action="store_true", help="skip the per-contender peak-RSS subprocesses")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--rss-child", choices=contenders, default=None, help=argparse.SUPPRESS)
    return p


def rss_in_subprocess(script: str, name: str, args, *, timeout: int = 1800) -> dict:
    """One contender alone in a fresh process (`--rss-child NAME`): its peak and steady RSS growth."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, str(Path(script).resolve()), "--rss-child", name, "--model", args.model,
           "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank), "--alpha", str(args.alpha),
           "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child_json(argv: list[str], *, timeout: int = 900) -> dict:
    """`python *argv` in a fresh process (a per-contender peak-RSS child): the JSON object its last stdout line
    prints, or {"error": its last stderr line}."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_adapter_benchmark(args, shapes, *, script: str, bench, report, rss_child, contenders, width: int) -> None:
    """Shape defaults, the RSS child, the interleaved rounds, the RSS subprocesses, the report and the JSON."""
    import gc
    import json
    import sys

    from rich.console import Console

    b, s = shapes.get(args.model, (1, 512))
    args.batch, args.seq = args.batch or b, args.seq or s
    if args.rss_child:
        return rss_child(args)
    console = Console(width=None if sys.stdout.isatty() else width)
    res = bench(args, console)
    gc.collect()
    if not args.no_rss:
        res["rss"] = {n: rss_in_subprocess(script, n, args) for n in contenders}
    report(res, console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv, "result": res}, indent=1))

