"""How much of graphllm's graphs torchair converts: the Ascend pre-flight over a matrix of models and layouts.

Runs `graphllm compile --backend npu --dry-run` for each configuration below (tiny and small presets, the HF
families graphllm loads, TP/SP/PP/VPP/DP/ZeRO-1/CoC/MC2 layouts, recompute policies, packed data, LoRA,
QLoRA, DPO/SimPO/reward models (rm, prm); each run also checks the generation graphs), reads each artifact's
preflight.json and prints, over all graphs of all configurations:

- the distinct ATen ops graphllm's graphs use, and how many of them torchair converts (implemented
  converter, or a partial one whose written conditions hold), how many only conditionally, how many not;
- the torch_npu kernels used, and every blocking (configuration, graph, op, why).

    python benchmarks/npu_coverage.py                 # all configurations (about 5 min on 2 CPU cores)
    python benchmarks/npu_coverage.py --only tiny-fp32 tp2-sp-mc2-bf16

The wheel: the installed torch_npu's sources, `--torch-npu-wheel PATH`, or the one graphllm caches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from graphllm.preflight.check import BLOCKING, CONDITIONAL, GraphCheck, worst_statuses

BASE = ["--backend", "npu", "--batch-size", "2", "--seq-len", "32"]
TINY = ["--model", "tiny-llama"]
CONFIGS: dict[str, list[str]] = {
    "tiny-fp32": TINY,
    "tiny-bf16-full-recompute": TINY + ["--amp", "bf16", "--recompute", "full"],
    "tiny-packed-selective": TINY + ["--eod-reset", "--recompute", "selective"],
    "tiny-budget-recompute": TINY + ["--recompute", "budget", "--recompute-budget", "0.5"],
    "tiny-lora": TINY + ["--lora-rank", "4"],
    "tiny-qlora": TINY + ["--qlora", "--lora-rank", "4"],
    "tiny-dpo": TINY + ["--task", "dpo"],
    "tiny-simpo": TINY + ["--task", "simpo"],
    "tiny-rm": TINY + ["--task", "rm"],
    "tiny-prm": TINY + ["--task", "prm"],
    "small-bf16": ["--model", "small-llama", "--amp", "bf16", "--seq-len", "64"],
    "tp2-sp": TINY + ["--tp", "2", "--sequence-parallel"],
    "tp2-sp-mc2-bf16": TINY + ["--tp", "2", "--sequence-parallel", "--mc2", "--amp", "bf16", "--recompute", "selective"],
    "tp2-coc-dp2-zero1": TINY + ["--tp", "2", "--coc-parallel-num", "2", "--dp", "2", "--zero1", "--batch-size", "1"],
    "tp2-pp2-vpp2": TINY + ["--tp", "2", "--pp", "2", "--vpp", "2", "--micro-batches", "2", "--batch-size", "1"],
    "readme-parallel": ["--model", "small-llama", "--tp", "2", "--pp", "2", "--sequence-parallel", "--micro-batches",
                        "4", "--batch-size", "1"],
}
HF_FAMILIES = ("llama", "qwen2-tied", "mistral-gqa-headdim")
"""Random-initialised HF checkpoints (tests/hf_parity.py's small configs), saved once per run."""


def hf_configs(tmp: Path) -> dict[str, list[str]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import hf_parity

    out = {}
    for family in HF_FAMILIES:
        path = hf_parity.save_hf_checkpoint(hf_parity.hf_model(family, "sdpa"), family, tmp / family)
        out[f"hf-{family}"] = ["--model", str(path), "--amp", "bf16"]
    return out


def dry_run(name: str, argv: list[str], out: Path, wheel: str | None) -> tuple[dict | None, float, int]:
    cmd = [sys.executable, "-m", "graphllm", "compile", *BASE, *argv, "--dry-run", "--out", str(out)]
    if wheel:
        cmd += ["--torch-npu-wheel", wheel]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    path = out / "preflight.json"
    if not path.is_file():
        print(f"{name}: no pre-flight (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        return None, seconds, proc.returncode
    return json.loads(path.read_text()), seconds, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    parser.add_argument("--torch-npu-wheel", help="the torch_npu wheel or its unpacked folder")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="npu-coverage-"))
    configs = {**CONFIGS, **hf_configs(tmp)}
    names = args.only or list(configs)
    checks: list[GraphCheck] = []
    blocking = []
    print(f"{'configuration':<26} {'graphs':>6} {'ops':>5} {'blocking':>8} {'seconds':>8}")
    for name in names:
        pre, seconds, code = dry_run(name, configs[name], tmp / name, args.torch_npu_wheel)
        if pre is None:
            blocking.append((name, "-", "-", f"compile failed (exit {code})"))
            continue
        mine = [GraphCheck.from_json(c) for c in pre["checks"]]
        checks += mine
        found = [(name, f"rank{c.rank} {c.graph}", o.op, f"{o.status}: {o.detail}") for c in mine for o in c.blocking]
        blocking += found
        ops = {o.op for c in mine for o in c.ops}
        print(f"{name:<26} {len(mine):>6} {len(ops):>5} {len(found):>8} {seconds:>8.1f}")
    status = worst_statuses(checks)  # op -> its most blocking status over all graphs
    by_kind: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for op, st in sorted(status.items()):
        kind = "aten" if op.startswith("aten.") else "npu" if op.startswith("npu.") else op.split(".")[0]
        by_kind[kind][st].append(op)
    print(f"\n{len(checks)} graphs checked; distinct ops by namespace and status (worst over all graphs):")
    for kind, sts in sorted(by_kind.items()):
        total = sum(len(v) for v in sts.values())
        print(f"  {kind}: {total} distinct — " + ", ".join(f"{len(v)} {s}" for s, v in sorted(sts.items())))
    for st in (CONDITIONAL, *BLOCKING):
        listed = [op for op, s in sorted(status.items()) if s == st]
        if listed:
            print(f"  {st}: {', '.join(listed)}")
    print(f"  torch_npu kernels: {', '.join(op for op in sorted(status) if op.startswith('npu.'))}")
    print(f"\nblocking: {len(blocking)}")
    for b in blocking:
        print("  " + " | ".join(b))
    return 1 if blocking else 0


if __name__ == "__main__":
    raise SystemExit(main())
