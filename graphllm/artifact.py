"""The artifact directory `graphllm compile` writes and `graphllm run` / `inspect` read.

Layout:
  plan.json                        the plan, the pipeline that ran, versions, model fingerprint, graph hash per rank
  graphs/rank0/model/NN_<pass>.py  model graph after each model-stage pass (code with provenance)
  graphs/rank0/model/NN_<pass>.tsv the same graph as a table (one node a line)
  graphs/rank0/train/forward.py    forward graph after partitioning and the train passes (and .tsv)
  graphs/rank0/train/backward.py   backward graph likewise
  report.json, report.md           nodes changed per pass, parameters, FLOPs, activation memory
  compile_cache/rank0.bin          inductor's compiled graphs and kernels for rank 0, keyed by graph hash, torch
                                   version and CPU ISA, so `graphllm run` skips code generation (compile_cache.py)
  invocation.json                  how `graphllm compile` was invoked: command line, graphllm's git commit, the
                                   --config file, every flag's final value and source (graphllm/job_config.py)
  runs/<run name>/metrics.jsonl    what each `graphllm run` measured, one JSON object per step (--run-name, or
                                   the start time); runs/ and profile/ survive a recompile into the same --out
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from graphllm.version import __version__
from graphllm.errors import GraphllmError
from graphllm.launch import pid_alive
from graphllm.plan import CompilePlan

FORMAT_VERSION = 2
"""plan.json's format: 2 holds the typed plan (sections layout / recompute / npu) and the pipeline that ran."""


def versions() -> dict[str, str]:
    import transformers

    return {"graphllm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def graphs_dir(root: Path, rank: int = 0) -> Path:
    return root / "graphs" / f"rank{rank}"


def prepare_out_dir(out: Path) -> Path:
    """A fresh temporary directory next to `out`; `commit_out_dir` moves it into place when complete.

    Refuses to replace a directory that is not a graphllm artifact, so user data is never lost.
    """
    if out.exists() and not out.is_dir():
        raise GraphllmError(f"--out {out} is a file, not a directory; choose a new directory")
    if out.exists() and not (out / "plan.json").exists() and any(out.iterdir()):
        raise GraphllmError(f"--out {out} exists and is not a graphllm artifact; choose an empty or new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(f".{out.name}.tmp-*-*"):  # a failed multi-rank compile's, once its process is gone
        pid = old.name.removeprefix(f".{out.name}.tmp-").split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))



KEPT_ON_RECOMPILE = ("runs", "profile")
"""What a recompile into the same --out carries over from the old artifact: the runs' metrics and the profiles
(measurements of earlier graphs, which a user compares against the new ones)."""


def commit_out_dir(tmp: Path, out: Path) -> list[str]:
    """Atomically replace `out` by `tmp` (the old artifact is removed only after the new one is whole),
    keeping the old artifact's KEPT_ON_RECOMPILE folders; returns those kept."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    kept = []
    if old is not None:
        for name in KEPT_ON_RECOMPILE:
            if (old / name).is_dir() and not (out / name).exists():
                (old / name).rename(out / name)
                kept.append(name)
        shutil.rmtree(old, ignore_errors=True)
    return kept


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


INVOCATION_FILE = "invocation.json"


def write_invocation(root: Path, record: dict[str, Any]) -> None:
    """Add invocation.json to a committed artifact (written whole under a temporary name, then renamed)."""
    tmp = root / f".{INVOCATION_FILE}.tmp-{os.getpid()}"
    write_json(tmp, record)
    os.replace(tmp, root / INVOCATION_FILE)


def read_invocation(root: Path) -> dict[str, Any] | None:
    """The artifact's invocation.json; None when absent or unreadable (an artifact compiled from Python)."""
    try:
        data = json.loads((root / INVOCATION_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_plan(root: Path) -> dict[str, Any]:
    """Read and validate plan.json: the artifact must exist and come from this graphllm version."""
    path = root / "plan.json"
    if not root.is_dir():
        raise GraphllmError(f"artifact {root} does not exist; create it with `graphllm compile --out {root}`")
    if not path.is_file():
        raise GraphllmError(f"{root} is not a graphllm artifact (no plan.json); create it with `graphllm compile`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraphllmError(f"{path} is corrupt ({e.__class__.__name__}: {e}); recompile the artifact") from e
    if not isinstance(data, dict) or "plan" not in data:
        raise GraphllmError(f"{path} is not a graphllm plan; recompile the artifact")
    if data.get("format") != FORMAT_VERSION:
        raise GraphllmError(f"artifact {root} has plan format {data.get('format')!r}, this graphllm reads format "
                            f"{FORMAT_VERSION}; recompile it with `graphllm compile`")
    if not isinstance(data.get("pipeline"), list):
        raise GraphllmError(f"{path} has no pipeline record; recompile the artifact")
    made_by = data.get("versions", {}).get("graphllm")
    if made_by != __version__:
        raise GraphllmError(f"artifact {root} was compiled by graphllm {made_by}, this is graphllm "
                            f"{__version__}; recompile it with `graphllm compile`")
    CompilePlan.from_json(data["plan"], str(path))  # field check
    return data
