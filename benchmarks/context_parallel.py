"""Context parallelism: how evenly ring attention's layouts spread the causal work, and what a long sequence costs.

`--part balance` times, for each ring rank and each token layout (zig-zag, contiguous), the forward + backward of
exactly the graphllm::attention_block calls ring attention makes on that rank: the blocks
`graphllm.planning.context.ring_schedule` lists for it (the schedule the graph pass unrolls), on random q/k/v of
the block's sizes, with random gradients for out and lse. One intra-op thread (torch.set_num_threads(1)) stands
for one rank per core; ranks and layouts run interleaved, `--reps` times each after a warm-up, and the table
gives the median per rank next to the schedule's analytic work (`step_work`: unmasked score entries) and the
entries the op's kernel computes (its query chunks compute a causal block's masked upper half within a chunk).

`--part long` compiles and runs a model through the CLI in subprocesses, once as one process and once with
`--cp N` (ring; `graphllm run` starts the ranks with torchrun), every process under an address-space budget
(`prlimit --as`, so a run that needs more fails with an allocation error instead of pushing the shared machine
into the OOM killer), and a watcher that kills the runs if all their processes together pass `--total-cap-gib`.
It samples each process's VmHWM (peak RSS) every `--sample-s` and reports it per rank, with the step times
rank 0 writes to metrics.jsonl (the first step includes warm-up; the later steps are the timed ones).

    python benchmarks/context_parallel.py --part balance --seq-len 8192 --reps 5
    python benchmarks/context_parallel.py --part long --seq-len 4096 --steps 2      # quick
    python benchmarks/context_parallel.py --part long --seq-len 32768 --steps 2 --budget-gib 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script
from common import fmt_mib, median  # noqa: E402

ORDERS = ("zigzag", "contiguous")
BALANCE_TARGET = 1.1  # the target for zig-zag: slowest rank / fastest rank
GIB = 2**30


# -- part 1: load balance ---------------------------------------------------------------------------------------
def rank_inputs(seq_len: int, ring: int, r: int, order: str, shape: dict, seed: int) -> list[tuple]:
    """(q, k, v, grad_out, grad_lse, causal) per attention block ring rank r computes over all ring steps."""
    import torch

    from graphllm.planning.context import ring_schedule

    g = torch.Generator().manual_seed(seed)
    h, hkv, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    out = []
    for step in ring_schedule(seq_len // ring, ring, r, order):  # local_len: the 2c tokens of one ring rank
        for b in step.blocks:
            rows, keys = b.q1 - b.q0, b.k1 - b.k0
            q = torch.randn(1, h, rows, d, generator=g).requires_grad_()  # [B, H, rows, D]
            k = torch.randn(1, hkv, keys, d, generator=g).requires_grad_()  # [B, Hkv, keys, D]
            v = torch.randn(1, hkv, keys, d, generator=g).requires_grad_()
            out.append((q, k, v, torch.randn(1, h, rows, d, generator=g), torch.randn(1, h, rows, generator=g),
                        b.causal))
    return out


def time_rank(blocks: list[tuple], scale: float) -> tuple[float, float]:
    """(wall, CPU) seconds for the forward and backward of every block of one rank, one block after another as
    the ring runs them. CPU time is this thread's (time.thread_time): with one intra-op thread all the work runs
    here (the CPU autograd engine runs on the calling thread), and it counts none of the other tenants' time."""
    import torch

    t0, c0 = time.perf_counter(), time.thread_time()
    for q, k, v, g_out, g_lse, causal in blocks:
        out, lse = torch.ops.graphllm.attention_block(q, k, v, None, None, scale, causal)
        torch.autograd.grad((out, lse), (q, k, v), (g_out, g_lse))
    return time.perf_counter() - t0, time.thread_time() - c0


def kernel_entries(blocks: list[tuple]) -> int:
    """Score entries the op's kernel computes per head for these blocks (its chunks: `row_chunks`)."""
    from graphllm.ops.attention_block import row_chunks

    return sum((q1 - q0) * k1 for q, k, *_, causal in blocks
               for q0, q1, k1 in row_chunks(q.shape[-2], k.shape[-2], causal))


def run_balance(args) -> dict:
    import torch

    import graphllm.ops  # noqa: F401  (registers torch.ops.graphllm)
    from graphllm.planning.context import check_divisible, step_work

    check_divisible(args.seq_len, args.cp, 1)
    torch.set_num_threads(1)  # one rank per core
    shape = {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim}
    scale = args.head_dim ** -0.5
    ranks = range(args.cp)
    inputs = {(o, r): rank_inputs(args.seq_len, args.cp, r, o, shape, seed=r) for o in ORDERS for r in ranks}
    for key in inputs:  # warm-up: allocator, MKL buffers
        time_rank(inputs[key], scale)
    times: dict[tuple, list[tuple[float, float]]] = {key: [] for key in inputs}
    keys = list(inputs)
    for rep in range(args.reps):  # rotated each repetition: no rank always runs right after another
        for key in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            times[key].append(time_rank(inputs[key], scale))
    res = {"seq_len": args.seq_len, "cp": args.cp, "shape": shape, "reps": args.reps, "orders": {}}
    for o in ORDERS:
        work = step_work(args.seq_len // args.cp, args.cp, o)
        res["orders"][o] = [{"rank": r, "blocks": len(inputs[o, r]), "work": work[r],
                             "kernel_entries": kernel_entries(inputs[o, r]),
                             "wall_s": median([w for w, _ in times[o, r]]),
                             "cpu_s": median([c for _, c in times[o, r]]), "times_s": times[o, r]} for r in ranks]
    return res


def report_balance(res: dict) -> None:
    import torch

    sh = res["shape"]
    print(f"\nload balance: S={res['seq_len']}, cp {res['cp']} (ring), B=1 H={sh['heads']} Hkv={sh['kv_heads']} "
          f"D={sh['head_dim']} fp32, attention_block fwd+bwd of each rank's ring_schedule blocks, 1 intra-op thread "
          f"(one rank per core), median of {res['reps']} interleaved repetitions; torch {torch.__version__}")
    print("| order | rank | blocks | analytic work (M entries/head) | kernel entries (M/head) | median wall | "
          "median CPU | CPU vs fastest rank |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for o, rows in res["orders"].items():
        fastest = min(row["cpu_s"] for row in rows)
        for row in rows:
            print(f"| {o} | {row['rank']} | {row['blocks']} | {row['work'] / 1e6:.2f} | "
                  f"{row['kernel_entries'] / 1e6:.2f} | {row['wall_s'] * 1e3:,.0f} ms | {row['cpu_s'] * 1e3:,.0f} ms | "
                  f"{row['cpu_s'] / fastest:.2f}x |")
    for o, rows in res["orders"].items():
        w = [row["work"] for row in rows]
        line = f"{o}: analytic max/min work {max(w) / min(w):.2f}"
        for kind in ("cpu", "wall"):
            t = [row[f"{kind}_s"] for row in rows]
            line += f"; {kind} max/min {max(t) / min(t):.2f}"
            if o == "zigzag":
                line += f" (target ≤ {BALANCE_TARGET}: {'met' if max(t) / min(t) <= BALANCE_TARGET else 'NOT met'})"
        print(line)


# -- part 2: a long sequence, one process vs cp ranks -------------------------------------------------------------
def descendants(root: int) -> list[int]:
    """root and every process under it (parent links from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after the (comm) field: state, ppid
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def proc_memory(pid: int) -> tuple[int, int] | None:
    """(VmHWM, VmRSS) in bytes: the process's peak RSS so far and its RSS now; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmHWM", "VmRSS")))
        return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def proc_role(pid: int, root: int) -> str:
    """'rank N' (RANK in its environment), 'torchrun', 'launcher' (the command we started), else its program."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().decode(errors="replace").split("\0")
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split("=", 1) for kv in f.read().decode(errors="replace").split("\0") if "=" in kv)
    except OSError:
        return "?"
    if any("torchrun" in c or "torch.distributed.run" in c for c in cmd):
        return "torchrun"
    if "RANK" in env and any("graphllm" in c for c in cmd):
        return f"rank {env['RANK']}"
    return "launcher" if pid == root else Path(cmd[0]).name


class TreeWatch:
    """Samples every process under `root`: VmHWM per process (its peak RSS), the sum of VmRSS over the tree and
    that sum's maximum. Kills the tree (SIGKILL to each of its processes, by pid) if the sum passes `cap`."""

    def __init__(self, root: int, cap: int, interval: float) -> None:
        self.root, self.cap, self.interval = root, cap, interval
        self.procs: dict[int, dict] = {}  # pid -> {"role", "peak_rss"}
        self.peak_total, self.killed = 0, ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "TreeWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        pids, total = descendants(self.root), 0
        for pid in pids:
            mem = proc_memory(pid)
            if mem is None:
                continue
            info = self.procs.setdefault(pid, {"role": "?", "peak_rss": 0})
            info["role"] = proc_role(pid, self.root)  # again each time: a fresh fork shows its parent's command
            info["peak_rss"] = max(info["peak_rss"], mem[0])
            total += mem[1]
        self.peak_total = max(self.peak_total, total)
        if total > self.cap and not self.killed:
            self.killed = f"killed: the processes' RSS reached {fmt_mib(total)} > --total-cap-gib"
            self.kill(pids)

    def kill(self, pids: list[int] | None = None) -> None:
        for pid in reversed(pids or descendants(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_watched(cmd: list[str], log: Path, args) -> dict:
    """Run `cmd` (under the address-space budget) with its output in `log`, watching its process tree."""
    limited = ["prlimit", f"--as={int(args.budget_gib * GIB)}", "--", *cmd]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(limited, cwd=log.parent, stdout=f, stderr=subprocess.STDOUT)
        with TreeWatch(p.pid, int(args.total_cap_gib * GIB), args.sample_s) as watch:
            try:
                rc = p.wait(timeout=args.timeout_s)
            except subprocess.TimeoutExpired:
                watch.kill()
                watch.killed, rc = f"killed: over --timeout-s {args.timeout_s}", p.wait()
    lines = log.read_text(errors="replace").splitlines()
    errors = [ln.strip() for ln in lines if any(w in ln for w in ("Error", "error:", "Killed", "can't allocate"))]
    return {"rc": rc, "wall_s": time.perf_counter() - t0, "killed": watch.killed, "peak_total": watch.peak_total,
            "procs": sorted(watch.procs.values(), key=lambda i: i["role"]),
            "error": watch.killed or (errors[-1] if errors else (lines[-1] if lines else ""))}


def long_model(args, root: Path) -> str:
    """--model, or when --seq-len passes the preset's max_position_embeddings (tiny-llama: 2048), the preset saved
    as an HF checkpoint under root/ with max_position_embeddings = --seq-len (rope needs no other change; the
    weights are the preset's seeded initialisation either way)."""
    import dataclasses

    from graphllm.models import build_model, save_hf
    from graphllm.models.presets import PRESETS

    cfg = PRESETS[args.model]()
    if args.seq_len <= cfg.max_position_embeddings:
        return args.model
    cfg = dataclasses.replace(cfg, max_position_embeddings=args.seq_len)
    return str(save_hf(build_model(cfg), cfg, root / f"{args.model}-{args.seq_len}"))


def long_data(root: Path) -> Path:
    """The built-in corpus as a `graphllm preprocess` dataset under root/data/. `graphllm run` keeps 1% of the
    built-in corpus (10,279 tokens) for validation and refuses a --seq-len longer than that; a dataset run with
    `--split 1000,0,0` has no valid split (the benchmark validates nothing), on the same tokens."""
    from graphllm.data import builtin_documents

    folder = root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in builtin_documents())
    subprocess.run([sys.executable, "-m", "graphllm", "preprocess", "pretrain", "--input", "corpus.jsonl",
                    "--tokenizer", "builtin", "--out", "corpus"], cwd=folder, check=True, capture_output=True)
    return folder / "corpus"


def long_case(name: str, cp: int, root: Path, args) -> dict:
    """Compile then run one case through the CLI; its artifact, logs and metrics go to root/name/."""
    folder = root / name.replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    artifact, metrics = folder / "artifact", folder / "metrics.jsonl"
    cli = [sys.executable, "-m", "graphllm"]
    plan = ["--model", args.model_path, "--seq-len", str(args.seq_len), "--batch-size", "1", "--backend", "eager"]
    if cp > 1:
        plan += ["--cp", str(cp), "--cp-algo", "ring"]
    res = {"name": name, "cp": cp}
    res["compile"] = run_watched([*cli, "compile", *plan, "--out", str(artifact)], folder / "compile.log", args)
    if res["compile"]["rc"] != 0:
        return res
    res["run"] = run_watched([*cli, "run", str(artifact), "--steps", str(args.steps), "--no-progress",
                              "--metrics", str(metrics), "--data", str(args.data), "--split", "1000,0,0"],
                             folder / "run.log", args)
    if metrics.exists():
        res["steps"] = [json.loads(ln) for ln in metrics.read_text().splitlines() if '"step_time_s"' in ln]
    return res


def _peaks(phase: dict) -> str:
    """'rank 0 1,234 MiB, rank 1 …' — the largest VmHWM seen per role (ranks first)."""
    best: dict[str, int] = {}
    for p in phase["procs"]:
        best[p["role"]] = max(best.get(p["role"], 0), p["peak_rss"])
    order = sorted(best, key=lambda r: (not r.startswith("rank"), r))
    return ", ".join(f"{r} {fmt_mib(best[r])}" for r in order)


def report_long(cases: list[dict], args) -> None:
    import torch

    print(f"\nlong sequence: {args.model}, batch 1 × {args.seq_len} tokens, eager backend, fp32, {args.steps} steps; "
          f"every process under an address-space budget of {args.budget_gib:g} GiB (prlimit --as); peak RSS = "
          f"VmHWM sampled every {args.sample_s:g} s; one process uses torch's default threads "
          f"({torch.get_num_threads()} here), each torchrun rank 1 (OMP_NUM_THREADS=1)")
    print("| run | outcome | peak RSS per process (run) | all processes' RSS peak | step 1 (warm-up) | "
          "median later step | tokens/s | compile |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for c in cases:
        phase = c.get("run", c["compile"])
        failed = phase["rc"] != 0
        where = "run" if "run" in c else "compile"
        over = " over the budget" if "allocate" in phase["error"] else ""
        outcome = f"failed{over} in {where} (rc {phase['rc']}): {phase['error'][:240]}" if failed else "ok"
        steps = [s["step_time_s"] for s in c.get("steps", [])]
        first = f"{steps[0]:.1f} s" if steps else "–"
        later = median(steps[1:]) if len(steps) > 1 else float("nan")
        timed = f"{later:.1f} s" if steps[1:] else "–"
        tok = f"{args.seq_len / later:,.0f}" if steps[1:] else "–"
        print(f"| {c['name']} | {outcome} | {_peaks(phase)} | {fmt_mib(phase['peak_total'])} | {first} | {timed} | "
              f"{tok} | {c['compile']['wall_s']:.0f} s, peak {_peaks(c['compile'])} |")
    for c in cases:
        if c.get("steps"):
            last = c["steps"][-1]
            print(f"{c['name']}: rank 0's own figure in metrics.jsonl (step {last['step']}): peak memory "
                  f"{fmt_mib(last['peak_memory_bytes'])}, loss {last['loss']:.4f}")


def run_long(args) -> list[dict]:
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="cp_bench_", dir=args.out))  # outside the repo root, which shadows graphllm
    try:
        args.model_path, args.data = long_model(args, root), long_data(root)
        runs = {"one": ("one process", 1), "cp": (f"cp{args.cp} ring", args.cp)}
        cases = [long_case(*runs[r], root, args) for r in (("one", "cp") if args.runs == "both" else (args.runs,))]
        if args.out is not None:
            (root / "result.json").write_text(json.dumps({"argv": sys.argv, "cases": cases}, indent=1))
            print(f"artifacts, logs and result.json in {root}", file=sys.stderr)
        return cases
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["balance", "long", "all"], default="balance")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 8192 for balance, "
                    "32768 for long)")
    ap.add_argument("--cp", type=int, default=4, help="ring ranks")
    ap.add_argument("--reps", type=int, default=5, help="balance: timed repetitions per rank and layout")
    for flag, default in (("--heads", 8), ("--kv-heads", 4), ("--head-dim", 32)):
        ap.add_argument(flag, type=int, default=default, help="balance: attention shape (tiny-llama's)")
    ap.add_argument("--model", default="tiny-llama", help="long: the model preset (a longer max_position_embeddings "
                    "when --seq-len needs it)")
    ap.add_argument("--runs", default="both", choices=["both", "one", "cp"], help="long: one process, cp ranks")
    ap.add_argument("--steps", type=int, default=2, help="long: optimizer steps per run (the first is warm-up)")
    ap.add_argument("--budget-gib", type=float, default=16.0, help="long: address-space limit of every process")
    ap.add_argument("--total-cap-gib", type=float, default=18.0,
                    help="long: kill a run whose processes' RSS together pass this (the machine is shared)")
    ap.add_argument("--sample-s", type=float, default=0.1, help="long: RSS sampling period")
    ap.add_argument("--timeout-s", type=int, default=3600, help="long: limit per compile or run command")
    ap.add_argument("--out", type=Path, default=None, help="long: keep artifacts, logs and result.json under a new "
                    "folder here (default: a temporary folder, removed)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seq_len = args.seq_len
    if args.part in ("balance", "all"):
        args.seq_len = seq_len or 8192
        report_balance(run_balance(args))
    if args.part in ("long", "all"):
        args.seq_len = seq_len or 32768
        report_long(run_long(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
