"""Megatron-LM checkpoint directories: find one, read its weights as one full state dict, write one.

A Megatron-LM `--save DIR` holds `latest_checkpointed_iteration.txt` (an iteration number, or `release`) and
`iter_XXXXXXX/` (or `release/`) directories in one of two formats:

- **legacy** (`--ckpt-format torch`): `mp_rank_TT/model_optim_rng.pt` (pp=1) or `mp_rank_TT_PPP/...` (tensor rank
  TT, pipeline rank PPP), each a torch.save of {'args', 'checkpoint_version', 'iteration', 'model' (or 'model0',
  'model1', ... per virtual pipeline chunk), 'optimizer', 'rng_state', ...}. A rank's model state dict numbers its
  layers from 0; layers follow each other chunk by chunk, stage by stage (chunk 0 of every stage, then chunk 1...),
  so a layer's global number is the count of layers before it in that order (this also covers uneven splits).
- **torch_dist** (megatron.core.dist_checkpointing): a torch.distributed.checkpoint directory (`.metadata`,
  `__R_N.distcp`) of global tensors, plus `common.pt` (the non-tensor state: args, iteration) and
  `metadata.json`. Layers of one kind are stacked into one tensor [num_layers, ...] (`decoder.layers.<name>`), or
  kept apart (`decoder.layers.N.<name>`) when the layers differ. Read in this process, without a process group.

Nothing read runs code from the checkpoint (graphllm/megatron_unpickle.py). Tensors of `.pt` files are
memory-mapped, so optimizer state stored beside the weights is never read into memory.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graphllm.errors import GraphllmError, exception_chain
from graphllm.megatron_layout import EXTRA_STATE, LAYER, LAYER_KEYS, canonical, merge_tp, split_tp
from graphllm.megatron_unpickle import dcp_reader, load_pt, reason

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
COMMON_FILE = "common.pt"
DIST_METADATA = "metadata.json"
CHECKPOINT_VERSION = 3.0
RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?")


@dataclass(kw_only=True)
class MegatronCheckpoint:
    """What was read: weights as one full state dict (graphllm.megatron_layout's "full" names) and the args."""

    path: Path
    """The iteration directory."""
    fmt: str
    """"legacy" or "torch_dist"."""
    args: dict | None
    """vars() of the checkpoint's argparse Namespace; None when it holds none."""
    iteration: int | None
    full: dict[str, torch.Tensor]
    extra: dict = field(default_factory=dict)
    """The checkpoint's 'graphllm' entry (written by graphllm-to-megatron: the HF config), if any."""
    notes: list[str] = field(default_factory=list)


def iteration_dir(path: Path) -> Path:
    """The iteration directory `path` stands for: a --save directory's latest (its tracker file), or itself."""
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text != "release" and not text.isdigit():
            raise GraphllmError(f"--megatron {tracker} holds {text[:40]!r}, not an iteration number or 'release'")
        found = path / ("release" if text == "release" else f"iter_{int(text):07d}")
        if not found.is_dir():
            raise GraphllmError(f"--megatron {tracker} names iteration {text}, but {found} does not exist")
        return found
    if path.is_dir() and (_rank_dirs(path) or (path / ".metadata").is_file()):
        return path
    why = "no such directory" if not path.exists() else f"no {TRACKER}, no mp_rank_*/ and no torch_dist files"
    raise GraphllmError(f"--megatron {path} is not a Megatron checkpoint ({why}); point it at Megatron-LM's --save "
                        "directory or at one iter_XXXXXXX/ inside it")


def read_checkpoint(path: Path) -> MegatronCheckpoint:
    d = iteration_dir(path)
    return _read_torch_dist(d) if (d / ".metadata").is_file() else _read_legacy(d)


# -- legacy ------------------------------------------------------------------------------------------------------
def _state(path: Path) -> dict:
    """A Megatron-LM checkpoint file's top-level dict."""
    state = load_pt(path)
    if not isinstance(state, dict):
        raise GraphllmError(f"{path} holds a {type(state).__name__}, not a Megatron-LM checkpoint's dict")
    return state


def _rank_dirs(d: Path) -> dict[tuple[int, int], Path]:
    """(tensor rank, pipeline rank) -> mp_rank_* directory; expert-parallel ones are refused."""
    found = {}
    for p in sorted(d.iterdir()) if d.is_dir() else []:
        m = RANK_DIR.fullmatch(p.name)
        if m is None or not p.is_dir():
            continue
        if m.group(3) is not None:
            raise GraphllmError(f"{p} is an expert-parallel shard (mixture of experts); graphllm converts dense models")
        found[(int(m.group(1)), int(m.group(2) or 0))] = p
    return found


def _read_legacy(d: Path) -> MegatronCheckpoint:
    dirs = _rank_dirs(d)
    if not dirs:
        raise GraphllmError(f"{d} holds no mp_rank_*/ shards and no torch_dist files (.metadata); the checkpoint is "
                            "incomplete")
    first = _state(_file(dirs[min(dirs)]))
    args = _args_of(first, dirs[min(dirs)] / MODEL_FILE)
    tp = int((args or {}).get("tensor_model_parallel_size") or 1 + max(t for t, _ in dirs))
    pp = int((args or {}).get("pipeline_model_parallel_size") or 1 + max(p for _, p in dirs))
    for t in range(tp):
        for p in range(pp):
            if (t, p) not in dirs:
                name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
                raise GraphllmError(f"{d / name / MODEL_FILE} is missing (tensor rank {t}, pipeline rank {p} of "
                                    f"tp={tp} x pp={pp}); copy the complete checkpoint")
    extra_ranks = sorted(set(dirs) - {(t, p) for t in range(tp) for p in range(pp)})
    if extra_ranks:
        raise GraphllmError(f"{dirs[extra_ranks[0]]} is outside the args' tp={tp} x pp={pp}; remove it or fix the args")
    chunks = sorted(k for k in first if re.fullmatch(r"model\d*", str(k)))
    if not chunks:
        raise GraphllmError(f"{dirs[min(dirs)] / MODEL_FILE} holds no model weights (no 'model' entry); nothing to "
                            "convert")
    notes = []
    if "optimizer" in first or any((p / "distrib_optim.pt").is_file() for p in dirs.values()):
        notes.append("the checkpoint's optimizer state was not converted (weights only: training restarts its "
                     "optimizer)")
    stages = {}  # (chunk, stage) -> {name: full tensor}, local layer numbers
    for p in range(pp):
        states = [first if (t, p) == min(dirs) else _state(_file(dirs[(t, p)])) for t in range(tp)]
        for c, chunk in enumerate(chunks):
            stages[(c, p)] = _merge_ranks([s.get(chunk) for s in states], [dirs[(t, p)] for t in range(tp)], chunk)
    full, offset = {}, 0
    for key in sorted(stages):  # chunk 0 of every stage, then chunk 1, ...
        local = stages[key]
        for name, t in local.items():
            m = LAYER.fullmatch(name)
            if m is None:  # embedding, final norm, output layer (with tied embeddings: the last stage's copy)
                full.setdefault(name, t)
                continue
            full[f"decoder.layers.{offset + int(m.group(1))}.{m.group(2)}"] = t
        offset += len({LAYER.fullmatch(n).group(1) for n in local if LAYER.fullmatch(n)})
    return MegatronCheckpoint(path=d, fmt="legacy", args=args, iteration=first.get("iteration"), full=full,
                              extra=first.get("graphllm") or {}, notes=notes)


def _file(rank_dir: Path) -> Path:
    f = rank_dir / MODEL_FILE
    if not f.is_file():
        raise GraphllmError(f"{f} is missing; copy the complete checkpoint")
    return f


def _args_of(state: dict, source: Path) -> dict | None:
    args = state.get("args")
    if args is None:
        return None
    if not isinstance(args, argparse.Namespace):
        raise GraphllmError(f"{source}: its 'args' entry is a {type(args).__name__}, not Megatron-LM's argparse "
                            "Namespace; pass --hf-config with the model's HF config.json")
    return vars(args)


def _merge_ranks(states: list[dict | None], dirs: list[Path], chunk: str) -> dict[str, torch.Tensor]:
    """One pipeline stage's full tensors (local layer numbers) from its tensor-parallel ranks' state dicts."""
    if any(s is None for s in states):
        bad = dirs[[s is None for s in states].index(True)]
        raise GraphllmError(f"{bad / MODEL_FILE} has no {chunk!r} entry but the first shard has; the shards are from "
                            "different checkpoints")
    names = list(states[0])
    for s, rank_dir in zip(states[1:], dirs[1:]):
        if set(s) != set(names):
            odd = sorted(set(s) ^ set(names))[0]
            raise GraphllmError(f"{rank_dir / MODEL_FILE} and {dirs[0] / MODEL_FILE} differ in key {odd!r}; the shards "
                                "are from different checkpoints")
    out = {}
    for name in names:
        try:
            full = canonical(name)
        except KeyError:
            raise GraphllmError(f"{dirs[0] / MODEL_FILE}: unknown state-dict key {name!r}" + _hint(name)) from None
        if full is None:
            continue
        bad = next((r for r, s in zip(dirs, states) if not isinstance(s[name], torch.Tensor)), None)
        if bad is not None:
            raise GraphllmError(f"{bad / MODEL_FILE}: {name} is not a tensor; the file is damaged")
        out[full] = merge_tp(full, [s[name] for s in states])
    return out


def _hint(name: str) -> str:
    if name.startswith("language_model."):
        return ("; this is a pre-Megatron-Core (legacy GPT) model: convert it to Megatron-Core first with "
                "Megatron-LM's tools/checkpoint/convert.py")
    return "; graphllm converts Megatron-Core GPT models of the llama family (RMSNorm, SwiGLU, RoPE)"


# -- torch_dist --------------------------------------------------------------------------------------------------
def _read_torch_dist(d: Path) -> MegatronCheckpoint:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if (d / DIST_METADATA).is_file():
        backend = json.loads((d / DIST_METADATA).read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise GraphllmError(f"{d / DIST_METADATA}: sharded_backend {backend!r} is not supported (torch_dist only)")
    common = load_pt(d / COMMON_FILE, mmap=False) if (d / COMMON_FILE).is_file() else {}
    if not isinstance(common, dict):
        raise GraphllmError(f"{d / COMMON_FILE} holds a {type(common).__name__}, not Megatron's common state dict")
    reader = dcp_reader(d)
    try:
        md = reader.read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 (whatever a malformed pickle makes the unpickler raise)
        raise GraphllmError(f"cannot read {d / '.metadata'} ({reason(e)}); the checkpoint is damaged") from None
    wanted, notes = {}, []
    for key, entry in md.items():
        if key.startswith("optimizer."):
            if not notes:
                notes.append("the checkpoint's optimizer state was not converted (weights only: training restarts "
                             "its optimizer)")
            continue
        if not isinstance(entry, TensorStorageMetadata) or EXTRA_STATE in key or key.startswith("rng_state"):
            continue  # pickled objects (rng states, TE extra state)
        try:
            canonical(key.replace("decoder.layers.", "decoder.layers.0.", 1) if _stacked(key) else key)
        except KeyError:
            raise GraphllmError(f"{d}: unknown state-dict key {key!r}" + _hint(key)) from None
        wanted[key] = torch.empty(entry.size, dtype=entry.properties.dtype)
    _dcp_load(wanted, reader, d)
    full = {}
    for key, t in wanted.items():
        if _stacked(key):  # [num_layers, ...]
            suffix = key.removeprefix("decoder.layers.")
            for n in range(t.shape[0]):
                full[canonical(f"decoder.layers.{n}.{suffix}")] = t[n].clone()
        else:
            full[canonical(key)] = t
    args = _args_of(common, d / COMMON_FILE)
    return MegatronCheckpoint(path=d, fmt="torch_dist", args=args, iteration=common.get("iteration"), full=full,
                              extra=common.get("graphllm") or {}, notes=notes)


def _stacked(key: str) -> bool:
    return key.startswith("decoder.layers.") and not key.removeprefix("decoder.layers.").split(".")[0].isdigit()


def _dcp_load(state: dict, reader, d: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        try:
            dcp.load(state, storage_reader=reader)
        except BaseException as e:  # noqa: BLE001 (DCP's CheckpointException is a BaseException)
            if not isinstance(e, Exception) and type(e).__name__ != "CheckpointException":
                raise  # KeyboardInterrupt, SystemExit
            inner = next((x for x in exception_chain(e) if x is not e), e)  # a rank's failure inside DCP's
            raise GraphllmError(f"cannot read the tensors of {d} ({type(inner).__name__}: {reason(inner)}); the "
                                "checkpoint is damaged or incomplete") from None


# -- writing (legacy) --------------------------------------------------------------------------------------------
def write_legacy(out: Path, full: dict[str, torch.Tensor], args: argparse.Namespace, *, tp: int, pp: int,
                 iteration: int, extra: dict) -> Path:
    """Megatron-LM's legacy layout of `full` under `out` (a fresh directory): the tracker file and
    `iter_XXXXXXX/` (or `release/` for iteration 0, which Megatron-LM's tracker cannot name), one
    model_optim_rng.pt per tensor x pipeline rank, in Megatron-Core's local-spec names; returns the
    iteration directory."""
    name = "release" if iteration == 0 else f"iter_{iteration:07d}"
    layers_per_stage = args.num_layers // pp
    for p in range(pp):
        stage = _stage(full, p, pp, layers_per_stage, tied=not args.untie_embeddings_and_output_weights)
        shards = {k: split_tp(k, v, tp) if v is not None else [None] * tp for k, v in stage.items()}
        for t in range(tp):
            rank_dir = out / name / (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
            rank_dir.mkdir(parents=True)
            state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                     "model": {k: v[t] for k, v in shards.items()}, "graphllm": extra}
            torch.save(state, rank_dir / MODEL_FILE)
    (out / TRACKER).write_text("release\n" if iteration == 0 else f"{iteration}\n")
    return out / name


def _stage(full: dict, p: int, pp: int, per: int, *, tied: bool) -> dict[str, torch.Tensor | None]:
    """Pipeline stage p's state dict as Megatron-Core's GPTModel.state_dict() has it: its order, local layer
    numbers, an `_extra_state` of None for each linear layer (a strict load_state_dict asks for them)."""
    out: dict[str, torch.Tensor | None] = {}
    if p == 0:
        out["embedding.word_embeddings.weight"] = full["embedding.word_embeddings.weight"]
    for local in range(per):
        src, dst = f"decoder.layers.{p * per + local}.", f"decoder.layers.{local}."
        for name in LAYER_KEYS:
            if name.endswith(EXTRA_STATE):
                out[dst + name] = None
            elif src + name in full:  # linear_qkv.bias: only with add_qkv_bias
                out[dst + name] = full[src + name]
    if p == pp - 1:
        out["decoder.final_layernorm.weight"] = full["decoder.final_layernorm.weight"]
        head = full.get("output_layer.weight")
        if head is None and tied and pp > 1:  # the last stage keeps its own copy of the tied embedding
            head = full["embedding.word_embeddings.weight"]
        if head is not None:
            out["output_layer.weight"] = head
        out["output_layer." + EXTRA_STATE] = None
    return out
