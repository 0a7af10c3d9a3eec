"""Out of disk space during a save: recognising it, and what a checkpoint needs (graphllm/trainer.py reports it)."""

from __future__ import annotations

import errno
import math
import shutil
from pathlib import Path

from graphllm.errors import GraphllmError, exception_chain


class DiskFull(GraphllmError):
    """A save found no space left on device (reported, with a failure event, where it happened)."""


def free_bytes(path: Path) -> float:
    """Free bytes where `path` is (DCP re-raises each rank's error pickled, without the ENOSPC underneath)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return float("inf")


def disk_full(exc: BaseException) -> bool:
    """Whether `exc`, its causes, or the per-rank failures DCP collects are "no space left on device"."""
    return any((isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)
               for e in exception_chain(exc))


def checkpoint_bytes(built) -> int:
    """About how many bytes one checkpoint takes: every full parameter in fp32 (a bf16 parameter is saved as its fp32
    master weight, graphllm.parallel.checkpoint), and AdamW's two fp32 states."""
    from graphllm.planning.sharding import shard_of

    total = 0
    for p in built.model.parameters():
        shard = shard_of(p)
        numel = math.prod(shard.full_shape) if shard is not None else p.numel()
        total += numel * (max(p.element_size(), 4) + 8)
    return total
