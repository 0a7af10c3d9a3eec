"""Training checkpoints for `graphllm run`: save a step from any layout, resume into any other.

The tensors go through graphllm.parallel.checkpoint (torch.distributed.checkpoint, one copy of each
full logical tensor): the parameters and the model's persistent buffers (Engine.named_state: DeepSeek-V3's
routing biases, which --moe-bias-update-rate trains outside the optimizer); the optimizer state through
graphllm.parallel.optim's layout-independent form;
the data position is the step number for the built-in corpus (batches are a function of seed and step)
and the sampler's consumed-sample count for `--data` (extra "sampler"); torch's RNG state rides along.
A checkpoint is `ROOT/step_<N>/`, written atomically. On SIGTERM/SIGINT or an exception inside a step,
`graphllm run --save` writes a final one for the last whole step (StopSignals, save_final).

A checkpoint whose marker says {"kind": "weights"} (what `graphllm convert hf-to-graphllm` writes) holds
parameters only: loading it starts training at step 0 with a fresh optimizer, and says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from graphllm.version import __version__
from graphllm.errors import GraphllmError

log = logging.getLogger(__name__)
WEIGHTS_ONLY = "weights"
"""Marker "kind" of a checkpoint without optimizer state, RNG or data position (a converted one)."""


def _meta(built, step: int) -> dict:
    meta = {"fingerprint": built.model.config.fingerprint(), "model": built.plan.model, "step": step,
            "layout": built.plan.layout.describe(), "graphllm": __version__,
            "config": built.model.config.to_dict()}  # lets `graphllm convert graphllm-to-hf` rebuild config.json
    if built.plan.lora.enabled:  # lets `convert lora-to-peft` / `merge-lora` write the adapter's config
        from graphllm.options import to_dict

        meta["lora"] = to_dict(built.plan.lora)
    return meta


def _tensors(built) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of the model: this rank's parameters and the model's persistent buffers."""
    return {**built.engine.named_params, **built.engine.named_state}


def _without_absent_mtp(path: Path, tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """`tensors` less the multi-token prediction modules (--mtp-layers) a converted checkpoint has no weights for:
    those keep the weights drawn from the seed (hf-to-graphllm keeps no MTP layers)."""
    from torch.distributed.checkpoint import FileSystemReader

    if not any(name.startswith("model.mtp.") for name in tensors):
        return tensors
    stored = FileSystemReader(path).read_metadata().state_dict_metadata
    absent = sorted(n for n in tensors if n.startswith("model.mtp.") and f"model/{n}" not in stored)
    if absent and rank == 0:
        log.warning("%s has no weights for the multi-token prediction modules (%d tensors, e.g. %s): they keep the "
                    "weights drawn from --seed", path, len(absent), absent[0])
    return {n: t for n, t in tensors.items() if n not in absent}


def weights_fingerprint(cfg) -> str:
    """The fingerprint a weights-only checkpoint records: the config's, with the attention form at its
    default (sdpa and eager attention use the same weights, so either may load it) and no MTP modules (a run with
    --mtp-layers loads the model's weights and draws the modules a converted checkpoint lacks)."""
    return dataclasses.replace(cfg, attn_implementation="sdpa", mtp_layers=0).fingerprint()


def save_step(root: Path, built, optimizer, step: int, *, keep_last: int = 0, extra: dict | None = None) -> Path:
    """Every rank calls this after optimizer step `step` (1-based); returns the checkpoint path.
    `extra`: further picklable state stored beside the RNG (the data sampler's position)."""
    from graphllm.parallel.checkpoint import prune_checkpoints, save_checkpoint
    from graphllm.parallel.optim import optimizer_state

    named = built.engine.named_params
    path = save_checkpoint(Path(root) / f"step_{step}", step=step, named_params=_tensors(built),
                           optim_state=optimizer_state(optimizer, named), extra={"rng": torch.get_rng_state(), **(extra or {})},
                           meta=_meta(built, step), st=built.engine.st)
    if keep_last > 0 and built.rank == 0:
        prune_checkpoints(Path(root), keep_last)
    return path


def resolve(path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """The checkpoint `--load PATH` names, verified against the checksums in its marker: a checkpoint
    directory must be intact; under a root, the newest intact `step_<N>` is chosen and each damaged newer
    one is skipped. Returns (checkpoint, [(skipped checkpoint, what is damaged)])."""
    from graphllm.parallel.checkpoint import MARKER, complete_checkpoints

    path = Path(path)
    if (path / MARKER).is_file():
        problem = damage(path)
        if problem:
            raise GraphllmError(f"--load {path}: the checkpoint is damaged ({problem}); load an older one, or its "
                                "root to take the newest intact one")
        return path, []
    skipped = []
    for candidate in complete_checkpoints(path) if path.is_dir() else []:
        problem = damage(candidate)
        if problem is None:
            return candidate, skipped
        skipped.append((str(candidate), problem))
    if skipped:
        raise GraphllmError(f"--load {path}: every checkpoint there is damaged "
                            f"({'; '.join(f'{c}: {p}' for c, p in skipped)}); there is nothing intact to resume from")
    raise GraphllmError(f"--load {path}: no complete graphllm checkpoint there (expected {MARKER} or step_<N>/ "
                        "directories); point it at a checkpoint written by `graphllm run --save`")


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (None: intact, or saved without checksums)."""
    from graphllm.parallel.checkpoint import MARKER
    from graphllm.parallel.integrity import verify

    try:
        marker = json.loads((Path(checkpoint) / MARKER).read_text())
    except (OSError, ValueError) as exc:
        return f"its {MARKER} is unreadable: {exc}"
    return verify(checkpoint, marker.get("files"))


def resolve_on_rank0(path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """`resolve` done once, by rank 0 (which reads the files), with the answer given to every rank."""
    from graphllm.parallel.groups import broadcast_object

    answer = None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        try:
            answer = ("ok", *resolve(path))
        except GraphllmError as exc:
            answer = ("error", str(exc))
    answer = broadcast_object(answer)
    if answer[0] == "error":
        raise GraphllmError(answer[1])
    return Path(answer[1]), list(answer[2])


def load_step(path: Path, built, optimizer, *, extra_out: dict | None = None,
              skipped: list[tuple[str, str]] | None = None) -> int:
    """Load parameters, optimizer state and RNG into this rank's layout; returns the step to resume after.
    `path` is a checkpoint or a root (its newest intact checkpoint; `skipped` receives (checkpoint, damage)
    for each damaged newer one, and `extra_out["checkpoint"]` the one loaded). `extra_out` receives the
    checkpoint's extra state (the sampler position; nothing for weights-only)."""
    from graphllm.parallel.checkpoint import MARKER, load_checkpoint
    from graphllm.parallel.optim import load_optimizer_state

    named = built.engine.named_params
    path, damaged = resolve_on_rank0(path)
    if skipped is not None:
        skipped.extend(damaged)
    if extra_out is not None:
        extra_out["checkpoint"] = str(path)
    try:
        kind = json.loads((path / MARKER).read_text()).get("kind")
    except (OSError, ValueError):
        kind = None  # load_checkpoint reports the damaged marker
    if kind == WEIGHTS_ONLY:
        loaded = load_checkpoint(path, named_params=_without_absent_mtp(path, _tensors(built), built.rank),
                                 want_optim=False, st=built.engine.st,
                                 expect_fingerprint=weights_fingerprint(built.model.config))
        if loaded.masters and hasattr(optimizer, "load_masters"):  # bf16 parameters: the unrounded fp32 weights
            optimizer.load_masters(named, loaded.masters)
        if built.rank == 0:
            log.warning("%s holds weights only (a converted checkpoint): training starts at step 0 with a fresh "
                        "optimizer and learning-rate schedule", path)
        return 0
    loaded = load_checkpoint(path, named_params=_tensors(built), want_optim=True, st=built.engine.st,
                             expect_fingerprint=built.model.config.fingerprint())
    load_optimizer_state(optimizer, named, loaded.optim_state)
    if isinstance(loaded.extra.get("rng"), torch.Tensor):
        torch.set_rng_state(loaded.extra["rng"])
    if extra_out is not None:
        extra_out.update(loaded.extra)
    return loaded.step


def save_final(root: Path, built, optimizer, status: dict, *, start_step: int, extra: dict | None = None,
               ) -> tuple[Path | None, str]:
    """The save-on-failure checkpoint: `ROOT/step_<completed>` unless nothing new was trained, the
    optimizer was interrupted mid-update, or that step is already saved. Returns (path or None, message)."""
    from graphllm.parallel.checkpoint import MARKER

    done = int(status.get("completed", start_step))
    if status.get("updating"):
        return None, "not saving: the failure hit the optimizer update, so the parameters are half-updated"
    if done <= start_step:
        return None, f"not saving: no step completed since step {start_step}"
    path = Path(root) / f"step_{done}"
    if (path / MARKER).is_file():
        return path, f"step {done} is already saved at {path}"
    return save_step(root, built, optimizer, done, extra=extra), f"saved step {done} at {path}"
