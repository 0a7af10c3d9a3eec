"""Out of disk space during a save: recognising it, and what a checkpoint needs (graphllm/trainer.py reports it);
`writing_output`, the converters' one line for it."""

from __future__ import annotations

import contextlib
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


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a full disk raises while writing weights: OSError; torch.save's zip writer and DCP (CheckpointFailed) a
    RuntimeError without the ENOSPC; safetensors its own SafetensorError, an Exception whose text has the ENOSPC."""
    from safetensors import SafetensorError

    return OSError, RuntimeError, SafetensorError


@contextlib.contextmanager
def writing_output(dest: Path, nbytes: int):
    """A full disk while writing `dest` (`nbytes` of weights) becomes one line saying how much room it needs. Since
    some writers' errors do not say ENOSPC, less free space than the output is taken as the cause too."""
    try:
        yield
    except _write_errors() as e:
        free = free_bytes(dest.parent)
        if not (disk_full(e) or free < nbytes):
            raise
        raise GraphllmError(f"--out {dest}: no space left on device ({free / 2**20:,.1f} MiB free; the weights take "
                            f"{nbytes / 2**20:,.1f} MiB); free space or write elsewhere") from None
