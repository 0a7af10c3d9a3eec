"""Time to the first step of `graphllm run` on a fresh machine cache: with the artifact's compile cache vs without.

    python benchmarks/cold_start.py                                  # tiny-llama and small-llama, 3 rounds
    python benchmarks/cold_start.py --models tiny-llama --rounds 5

Each model is compiled once (`graphllm compile --model M --out DIR`, the default plan: inductor). Then, for
`--rounds` rounds, two contenders run interleaved (the order rotated each round), each as its own process
`graphllm --verbose run DIR --steps 1 --no-progress` with `TORCHINDUCTOR_CACHE_DIR` and `TRITON_CACHE_DIR`
pointing at a new empty directory (removed afterwards), so nothing compiled earlier on this machine helps:

- **artifact cache**: the run loads the kernels the artifact holds (graphllm/compile_cache.py);
- **no cache**: the same run with `--no-compile-cache` (what every run did before).

Timed from the process start, by reading its standard error: **ready** (the `ready` line: model loaded, graph
captured and passed, compiled, one warm-up forward/backward done) and **step 1** (the first step's line: the
first training step done). The breakdown comes from the run's own `compiled in` log line (model load, capture
with torch.export, the model/lowering passes, loading the compile cache, compile = Dynamo + aot_autograd +
inductor + the warm-up step); "startup" is what is left of `ready`: interpreter start, imports, reading the plan,
opening the data feed. `--import-rounds` also times `import graphllm.job, graphllm.trainer` alone. The step-1
losses of both contenders (from --metrics) must be bitwise equal. Figures are medians; the host's CPU and load
are printed with the command. graphllm's data cache ($GRAPHLLM_CACHE: corpus, tokenizer) stays warm.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave, median

CONTENDERS = {"artifact cache": [], "no cache": ["--no-compile-cache"]}
PHASES = ("model", "capture", "passes", "compile_cache", "compile")
_TIMINGS = re.compile(r"compiled in [\d.]+ s \(compile cache: (\w+)\): (.*)")


def host_line() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    from graphllm.compile_cache import machine_isa

    return f"{model}, {os.cpu_count()} CPUs, ISA key: {machine_isa()}; load average {os.getloadavg()[0]:.2f}"


def graphllm_cmd() -> list[str]:
    exe = shutil.which("graphllm")
    return [exe] if exe else [sys.executable, "-m", "graphllm"]


def compile_once(model: str, out: Path, extra: list[str]) -> None:
    cmd = graphllm_cmd() + ["compile", "--model", model, "--out", str(out), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL)


def run_once(art: Path, flags: list[str], work: Path) -> dict:
    """One `graphllm run --steps 1` on empty torch caches: seconds to ready and to step 1, its breakdown, loss."""
    cache = Path(tempfile.mkdtemp(prefix="inductor-", dir=work))
    metrics = work / f"metrics-{cache.name}.jsonl"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
    cmd = graphllm_cmd() + ["--verbose", "run", str(art), "--steps", "1", "--no-progress", "--metrics", str(metrics),
                            *flags]
    out: dict = {"cmd": " ".join(cmd)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        now = time.perf_counter() - t0
        lines.append(line.rstrip())
        if "ready" not in out and line.startswith("ready"):
            out["ready"] = now
        elif "step 1" not in out and re.match(r"step +1/1 ", line):
            out["step 1"] = now
        elif m := _TIMINGS.search(line):
            out["cache"] = m.group(1)
            out.update({k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", m.group(2))})
    if proc.wait() != 0 or "step 1" not in out:
        raise SystemExit(f"{out['cmd']} failed (exit {proc.returncode}):\n" + "\n".join(lines[-20:]))
    out["startup"] = out["ready"] - sum(out.get(k, 0.0) for k in PHASES)
    out["loss"] = next(json.loads(ln)["loss"] for ln in metrics.read_text().splitlines() if '"loss"' in ln)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def import_seconds(rounds: int) -> float:
    code = "import time; t = time.perf_counter(); import graphllm.job, graphllm.trainer; print(time.perf_counter() - t)"
    return median([float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                        cwd=tempfile.gettempdir()).stdout) for _ in range(rounds)])


def bench_model(model: str, args: argparse.Namespace, work: Path) -> None:
    art = work / model
    compile_once(model, art, args.compile_args)
    runs: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    for order in interleave(list(CONTENDERS), args.rounds):
        for name in order:
            runs[name].append(run_once(art, CONTENDERS[name], work))
            r = runs[name][-1]
            print(f"  {name:<15} step 1 {r['step 1']:5.1f} s, ready {r['ready']:5.1f} s (cache {r.get('cache')}): "
                  + ", ".join(f"{k} {r.get(k, 0.0):.2f}" for k in ("startup", *PHASES)), flush=True)
    print(f"\n{model}: medians of {args.rounds} rounds, seconds from process start (empty TORCHINDUCTOR_CACHE_DIR)")
    print("$", runs["artifact cache"][0]["cmd"])
    cols = ("step 1", "ready", "startup", *PHASES)
    print(f"  {'contender':<15}" + "".join(f"{c:>14}" for c in cols))
    for name, rs in runs.items():
        print(f"  {name:<15}" + "".join(f"{median([r.get(c, 0.0) for r in rs]):>14.2f}" for c in cols))
    with_, without = (median([r["step 1"] for r in runs[n]]) for n in CONTENDERS)
    print(f"  speed-up to step 1: {without / with_:.2f}x")
    losses = {r["loss"] for rs in runs.values() for r in rs}
    print(f"  step-1 losses bitwise equal across all runs: {'yes' if len(losses) == 1 else f'NO: {sorted(losses)}'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "small-llama"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--import-rounds", type=int, default=3, help="time the bare imports this many times (0: skip)")
    ap.add_argument("--compile-args", nargs=argparse.REMAINDER, default=[],
                    help="further `graphllm compile` flags (last on the command line)")
    args = ap.parse_args()
    print("$", " ".join([sys.executable, *sys.argv]))
    print("host:", host_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="cold_start-") as tmp:
        for model in args.models:
            bench_model(model, args, Path(tmp))
    if args.import_rounds:
        print(f"\nimport graphllm.job, graphllm.trainer (median of {args.import_rounds}): "
              f"{import_seconds(args.import_rounds):.2f} s")
    print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
