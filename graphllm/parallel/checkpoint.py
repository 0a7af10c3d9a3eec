"""Layout-independent training checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a directory (`step_<N>/` by convention) of DCP files plus `graphllm_checkpoint.json`.
It stores each full logical tensor once: a tensor-parallel shard is saved as a DTensor, Shard(dim)
over its group's mesh dimension (an expert shard split over ep and tp: over both; a fused expert gate|up
weight in its stored form with an explicit block axis, graphllm/parallel/stored_form.py); a whole tensor is saved plainly by every rank that holds it, and DCP's
save planner keeps one copy of each (fqn, offset) chunk, which drops data-, context- and tensor-parallel
replicas. Any layout, or one process without a process group, can therefore load any checkpoint.

Keys: "model/<fqn>" (fp32 under --params-dtype bf16: the optimizer's master weights, so the checkpoint is the
same fp32 model whatever the run's params dtype; loading rounds it into bf16 parameters and hands the fp32 values
to the optimizer as its masters), "optim/<fqn>/<state name>" (sharded like the parameter when shaped like it),
"optim/step", "extra/<name>" (rank 0's values). Non-tensor values are stored wrapped in a 1-tuple so
DCP pickles them whole instead of flattening dicts into keys.

Atomic: DCP writes into a hidden temp sibling chosen by rank 0; after every rank has written, rank 0
writes the json marker last — with the size and checksum of every file (graphllm/parallel/integrity.py),
which loading verifies — and renames the temp directory onto `path`. A crash before the rename leaves
nothing at `path` (only a `.step_<N>.tmp-*` sibling, which the next run on the root removes); readers
require the marker. All ranks must see `path` on one filesystem. The directory gets the user's umask
(not mkdtemp's 0700), so a process under another uid can read it.
"""

from __future__ import annotations

import dataclasses

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from graphllm.data.cache import atomic_write
from graphllm.errors import GraphllmError
from graphllm.parallel.groups import gather_objects
from graphllm.parallel.integrity import file_records
from graphllm.parallel.stored_form import as_dtensor, mesh_problem, model_shape, stored_shape, stored_view
from graphllm.planning.sharding import ParamShard, shard_of
from graphllm.signals import stopped_at_once

MARKER = "graphllm_checkpoint.json"
FORMAT = "graphllm-dcp/1"
STEP_DIR = re.compile(r"step_(\d+)")
TMP_DIR = re.compile(r"\.step_\d+\.tmp-.+")
"""The temp directory of an unfinished save (`.step_<N>.tmp-<random>`)."""


def _dir_mode() -> int:
    """0o777 less the umask: a directory's mode as mkdir would make it (mkdtemp makes 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


DIR_MODE = _dir_mode()  # read once at import: os.umask can only be read by setting it


@dataclass(slots=True)
class LoadedCheckpoint:
    step: int
    optim_state: dict | None
    """{"step": int, "state": {fqn: {name: Tensor}}, "master": {fqn: fp32 Tensor}}, tensors shaped like this rank's
    local params; "master" holds the fp32 weights loaded for bf16 parameters (their optimizer's master weights)."""
    extra: dict
    meta: dict
    """The marker json: the caller's meta plus "format" and "step"."""
    masters: dict = dataclasses.field(default_factory=dict)
    """{fqn: fp32 Tensor}: the weights loaded for non-fp32 parameters before rounding (also without want_optim: a
    weights-only load under --params-dtype bf16 hands them to the optimizer as its masters)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0



def _agree(error: str | None) -> None:
    """Raise the first rank's error on every rank: a rank entering a DCP collective alone would hang."""
    error = next((e for e in gather_objects(error) if e), None)
    if error:
        raise GraphllmError(error)


class CheckpointFailed(RuntimeError):
    """torch.distributed.checkpoint's CheckpointException (a BaseException, which `except Exception` misses: a
    full disk would end the run with a traceback instead of being reported), re-raised as an ordinary error with
    the original as its cause (its per-rank failures stay readable through graphllm.errors.exception_chain)."""


def _dcp(fn, state: dict, **kw) -> None:
    """dcp.save/load; without a process group DCP works in one process, which is intended here."""
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        try:
            fn(state, **kw)
        except CheckpointException as exc:
            failures = [f[0] if isinstance(f, tuple) and f else f for f in exc.failures.values()]
            if stopped_at_once() is not None or not all(isinstance(f, Exception) for f in failures):
                raise  # a signal stopped the save: it must end the run at once, not be handled as an error
            raise CheckpointFailed(f"torch.distributed.checkpoint failed on rank(s) {sorted(exc.failures)}: "
                                   f"{type(failures[0]).__name__}: {failures[0]}") from exc


def _shard(t: torch.Tensor) -> ParamShard | None:
    """The tensor's ParamShard when it really is split (a 1-of-1 shard is whole)."""
    s = shard_of(t)
    return s if s is not None and s.count > 1 else None


def _unwrap(value):
    return value[0] if isinstance(value, tuple) else value


def _for_save(value, shard: ParamShard | None, st, fqn: str = ""):
    """What DCP saves for `value`: a DTensor of its stored form when sharded, the stored form, or a 1-tuple."""
    if not isinstance(value, torch.Tensor):
        return (value,)
    if shard is not None:
        return as_dtensor(fqn, value.detach(), shard, st)
    return stored_view(fqn, value.detach())


def save_checkpoint(path: Path, *, step: int, named_params: dict[str, torch.nn.Parameter], optim_state: dict | None,
                    extra: dict, meta: dict, st) -> Path:
    """Every rank calls this with its local params; returns `path` once the checkpoint is complete there.

    `optim_state`: {"step": int, "state": {fqn: {name: Tensor}}} (local, like the params) or None; its optional
    "master": {fqn: fp32 Tensor} (graphllm.parallel.master_weights) is saved as those parameters' weights.
    `extra`: rank 0's values are stored (tensors or picklable objects). `meta` must be json-able; a
    "fingerprint" key is what load_checkpoint's `expect_fingerprint` compares against."""
    path = Path(path)
    error, tmp = None, None
    for fqn, p in named_params.items():
        if (shard := _shard(p)) is not None:
            error = error or mesh_problem(fqn, shard, st)
    for fqn in (optim_state or {}).get("state", {}):
        if fqn not in named_params:
            error = error or f"optimizer state names {fqn}, which is not among this rank's parameters"
    if _rank() == 0 and error is None:
        if path.exists():
            what = "a complete checkpoint" if (path / MARKER).is_file() else "something that is not a graphllm checkpoint"
            error = f"{path} already holds {what}; refusing to overwrite it: save to a new directory or delete it first"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)
            os.chmod(tmp, DIR_MODE)
    try:  # from here on, anything that stops the save (a second SIGTERM included) removes the temp dir
        proposals = gather_objects((error, tmp))
        error = next((e for e, _ in proposals if e), None)
        if error:
            raise GraphllmError(error)
        state = _state_to_save(named_params, optim_state, extra, st)
        _dcp(dcp.save, state, storage_writer=FileSystemWriter(proposals[0][1]))  # collective: every rank wrote
        failure = None
        if _rank() == 0:
            try:
                _publish(Path(tmp), path, {**meta, "format": FORMAT, "step": int(step)})
            except Exception as exc:  # noqa: BLE001 (re-raised below, after telling the other ranks)
                failure = exc
        reports = gather_objects(repr(failure) if failure else None)
        if failure is not None:
            raise failure
        if reports[0]:
            raise GraphllmError(f"checkpoint {path} was not saved: rank 0 failed to publish it ({reports[0]})")
    except BaseException:
        if _rank() == 0 and tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _state_to_save(named_params: dict, optim_state: dict | None, extra: dict, st) -> dict:
    """The DCP state dict of a save: parameters, optimizer states (sharded like their parameter), rank 0's extras."""
    # an optimizer with fp32 master weights (--params-dtype bf16) gives them: they are the model's weights, saved
    # in place of the rounded bf16 parameters, so the checkpoint is the fp32 model any layout or dtype resumes
    masters = (optim_state or {}).get("master") or {}
    state: dict = {f"model/{fqn}": _for_save(masters.get(fqn, p), _shard(p), st, fqn) for fqn, p in named_params.items()}
    if optim_state is not None:
        state["optim/step"] = (int(optim_state["step"]),)
        for fqn, named in optim_state["state"].items():
            p = named_params[fqn]
            for name, t in named.items():
                # only a state shaped like the local param shares its sharding; others (0-dim step) are whole
                like_param = isinstance(t, torch.Tensor) and t.shape == p.shape
                state[f"optim/{fqn}/{name}"] = _for_save(t, _shard(p) if like_param else None, st,
                                                         fqn if like_param else "")
    if _rank() == 0:
        state.update({f"extra/{k}": _for_save(v, None, st) for k, v in extra.items()})
    return state


def _publish(tmp: Path, path: Path, marker: dict) -> None:
    """Write the marker (last file, with every file's checksum), then rename the temp directory onto
    `path` (rank 0)."""
    marker = {**marker, "files": file_records(tmp, skip=(MARKER,))}
    atomic_write(tmp / MARKER, (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode())
    if path.exists():
        raise GraphllmError(f"{path} appeared while the checkpoint was being written; refusing to overwrite it: "
                            "save to a new directory")
    os.rename(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename durable
    os.fsync(fd)
    os.close(fd)


def _open(path: Path, expect_fingerprint: str | None) -> tuple[str | None, dict, dict]:
    """(error, marker, DCP key -> storage metadata) read from disk by this rank."""
    if not path.is_dir():
        return f"checkpoint {path} does not exist; check the path (or start without --resume)", {}, {}
    if not (path / MARKER).is_file():
        return (f"{path} is not a complete graphllm checkpoint (no {MARKER}: an interrupted save or another "
                "format); pick another checkpoint"), {}, {}
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as exc:
        return f"cannot read {path / MARKER}: {exc}; the checkpoint is damaged: pick another one", {}, {}
    fingerprint = marker.get("fingerprint")
    if expect_fingerprint is not None and fingerprint != expect_fingerprint:
        return (f"checkpoint {path} is for another model (fingerprint {fingerprint}, this model {expect_fingerprint}); "
                "load it with the model it was saved from"), marker, {}
    return None, marker, FileSystemReader(path).read_metadata().state_dict_metadata


def stored_parameters(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's parameters (the "model/" keys) as meta tensors of their stored dtype in the model's shapes
    (fused expert weights without their stored block axis), for readers that build the tensors to load into."""
    md = FileSystemReader(path).read_metadata().state_dict_metadata
    return {k.removeprefix("model/"): torch.empty(model_shape(k.removeprefix("model/"), tuple(e.size)),
                                                  dtype=e.properties.dtype, device="meta")
            for k, e in md.items() if k.startswith("model/") and isinstance(e, TensorStorageMetadata)}


def _target(local: torch.Tensor, shard: ParamShard | None, st, form: str):
    """What DCP loads into: `local` itself (in its stored form), a DTensor over it, or a full tensor to slice
    afterwards. `form`: the fqn whose stored form (graphllm/parallel/stored_form.py) the checkpoint holds, or
    "" for the model's own shape."""
    if shard is None:
        return stored_view(form, local)
    if mesh_problem(form, shard, st) is None:
        return as_dtensor(form, local, shard, st)
    return torch.empty(stored_shape(form, shard.full_shape), dtype=local.dtype, device=local.device)


def load_checkpoint(path: Path, *, named_params: dict[str, torch.nn.Parameter], want_optim: bool, st,
                    expect_fingerprint: str | None) -> LoadedCheckpoint:
    """Every rank calls this with its own layout's local params; copies the checkpoint into them in place."""
    path = Path(path)
    error, marker, md = _open(path, expect_fingerprint)
    state: dict = {}
    fills: list[tuple[str, torch.Tensor, ParamShard | None]] = []  # (key, local destination, shard)
    optim: dict[str, dict[str, torch.Tensor]] = {}
    masters: dict[str, torch.Tensor] = {}  # fp32 weights loaded for non-fp32 parameters (their master weights)

    def want(key: str, local: torch.Tensor, shard: ParamShard | None, form: str = "") -> None:
        state[key] = _target(local, shard, st, form)
        fills.append((key, local, shard))

    for fqn, p in named_params.items() if error is None else ():
        shard = _shard(p)
        full = tuple(shard.full_shape if shard else p.shape)
        stored = stored_shape(fqn, full)  # or `full`: a fused expert weight saved before the block axis
        entry = md.get(f"model/{fqn}")
        form = fqn if isinstance(entry, TensorStorageMetadata) and tuple(entry.size) == stored else ""
        if not isinstance(entry, TensorStorageMetadata):
            error = error or (f"checkpoint {path} has no parameter {fqn}; it was saved from a model with other "
                              "parameter names: load a checkpoint of this model")
        elif tuple(entry.size) not in (stored, full):
            error = error or (f"checkpoint {path} has {fqn} shaped {tuple(entry.size)} but the model's is {stored}; "
                              "load a checkpoint of this model configuration")
        elif entry.properties.dtype == torch.float32 and p.dtype in (torch.bfloat16, torch.float16):
            masters[fqn] = torch.empty(p.shape, dtype=torch.float32, device=p.device)  # copied into p below
            want(f"model/{fqn}", masters[fqn], shard, form)
        else:
            want(f"model/{fqn}", p.detach(), shard, form)
    if error is None and want_optim:
        if "optim/step" not in md:
            error = f"checkpoint {path} holds no optimizer state; load it with want_optim=False (weights only)"
        state["optim/step"] = None
        for key, entry in md.items():
            fqn, _, name = key.removeprefix("optim/").rpartition("/")
            if not key.startswith("optim/") or fqn not in named_params:
                continue
            p = named_params[fqn]
            shard = _shard(p)
            if not isinstance(entry, TensorStorageMetadata):
                state[key] = None
                continue
            full = tuple(shard.full_shape if shard else p.shape)
            stored = stored_shape(fqn, full)
            like_param = tuple(entry.size) in (stored, full)
            local = torch.empty(p.shape if like_param else entry.size, dtype=entry.properties.dtype, device=p.device)
            optim.setdefault(fqn, {})[name] = local
            want(key, local, shard if like_param else None, fqn if tuple(entry.size) == stored else "")
    for key, entry in md.items():
        if key.startswith("extra/"):
            tensor = isinstance(entry, TensorStorageMetadata)
            state[key] = torch.empty(entry.size, dtype=entry.properties.dtype) if tensor else None
    _agree(error)

    try:
        _dcp(dcp.load, state, storage_reader=FileSystemReader(path))
    except Exception as exc:  # noqa: BLE001 (torch's text can suggest unsafe loading: never repeat it)
        raise GraphllmError(f"checkpoint {path} could not be read ({type(exc).__name__}: {_first_line(exc)}); "
                            "it is damaged: load an older checkpoint") from exc
    with torch.no_grad():
        for key, local, shard in fills:
            got = state[key]
            got = got.to_local() if isinstance(got, DTensor) else got
            if got.data_ptr() == local.data_ptr():
                continue  # read in place (a view of `local`)
            if shard is not None and got.numel() != local.numel():  # full tensor loaded without a mesh
                got = shard.slice_of(got.reshape(shard.full_shape))
            local.copy_(got.reshape(local.shape))
        for fqn, master in masters.items():
            named_params[fqn].detach().copy_(master)  # the parameter: its master, rounded
    for key, value in state.items():
        fqn, _, name = key.removeprefix("optim/").rpartition("/")
        if key.startswith("optim/") and fqn in named_params and not isinstance(value, torch.Tensor):
            optim.setdefault(fqn, {})[name] = _unwrap(value)
    optim_state = {"step": int(_unwrap(state["optim/step"])), "state": optim, "master": masters} if want_optim else None
    extra = {k.removeprefix("extra/"): _unwrap(v) for k, v in state.items() if k.startswith("extra/")}
    return LoadedCheckpoint(step=int(marker["step"]), optim_state=optim_state, extra=extra, meta=marker,
                            masters=masters)


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip() and "weights_only" not in ln]
    return lines[0].strip()[:200] if lines else "no detail"


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    if not Path(root).is_dir():
        return []
    found = [(int(m.group(1)), d) for d in Path(root).iterdir()
             if (m := STEP_DIR.fullmatch(d.name)) and (d / MARKER).is_file()]
    return sorted(found)


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete `step_<N>` directories under `root`, newest first."""
    return [d for _, d in reversed(_complete_steps(root))]


def latest_checkpoint(root: Path) -> Path | None:
    """The complete `step_<N>` directory under `root` with the largest N, or None."""
    steps = _complete_steps(root)
    return steps[-1][1] if steps else None


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete `step_<N>` checkpoints (rank 0 only; other ranks
    do nothing). Other files and incomplete directories are left alone. Returns what was deleted."""
    if keep_last < 1:
        raise GraphllmError(f"--keep-last must be ≥ 1 (the newest checkpoint is never deleted), got {keep_last}")
    if _rank() != 0:
        return []
    doomed = [d for _, d in _complete_steps(root)[:-keep_last]]
    for d in doomed:
        (d / MARKER).unlink()  # first, so a crash mid-delete leaves an incomplete directory, never a broken one
        shutil.rmtree(d)
    return doomed
