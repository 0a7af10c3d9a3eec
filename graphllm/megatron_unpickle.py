"""Reading Megatron's pickled files without running code from them.

A checkpoint is data someone else wrote, and pickles are programs. `load_pt` reads a torch.save file with torch's
weights_only loader; every class or function the pickle names that is not argparse.Namespace (Megatron's enums,
functions, numpy RNG states, io.BytesIO extra states) becomes an inert stand-in keeping its arguments as data
(collections.defaultdict becomes a dict), so args and state dicts load whatever Megatron version wrote them, and
nothing the file names is called. torch.distributed.checkpoint's own FileSystemReader unpickles `.metadata` with
plain pickle: `dcp_reader` reads it with an unpickler that builds only torch.distributed.checkpoint's dataclasses
and enums, torch.Size and dtypes (the tensors themselves DCP reads with weights_only).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import pickle
import warnings
from pathlib import Path

import torch

from graphllm.errors import GraphllmError


class _Unloaded:
    """An object of a class a checkpoint's pickle names that is not imported: its arguments and state kept."""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.state = state


def _plain_dict(*args, **kwargs) -> dict:
    """collections.defaultdict read as a dict (the weights_only loader fills only plain dicts)."""
    return {}


def load_pt(path: Path, *, mmap: bool = True):
    """torch.load without running code from the file (see the module docstring); tensors memory-mapped."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        kept = {"argparse.Namespace": argparse.Namespace, "collections.defaultdict": (_plain_dict,
                                                                                      "collections.defaultdict")}
        allowed = [kept.get(n) or (type(n.rpartition(".")[2], (_Unloaded,), {"qualname": n}), n) for n in names]
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 (whatever a malformed file makes the unpickler raise)
        raise GraphllmError(f"cannot read {path} ({reason(e)}); the file is damaged, or holds objects only code "
                            "from it could build") from None


def reason(e: BaseException) -> str:
    """The line of torch's error that says what failed (never its advice to load without weights_only)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not any(w in ln.lower() for w in ("weights_only", "weights only", "documentation",
                                                                        "file an issue"))]
    return (useful or [type(e).__name__])[0][:200]


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what a DCP `.metadata` file holds: torch.distributed.checkpoint's dataclasses and enums,
    torch.Size, dtypes and memory layouts."""

    def find_class(self, module: str, name: str):
        obj = None
        if module.startswith("torch.distributed.checkpoint."):
            try:
                obj = getattr(importlib.import_module(module), name, None)
            except ImportError:
                obj = None
            if not (isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))):
                obj = None
        elif (module, name) in (("torch", "Size"), ("torch.serialization", "_get_layout"),
                                ("collections", "OrderedDict")):
            obj = getattr(importlib.import_module(module), name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")
        return obj


def dcp_reader(d: Path):
    """torch.distributed.checkpoint's FileSystemReader of `d`, reading `.metadata` with _MetadataUnpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(d / ".metadata", "rb") as f:
                md = _MetadataUnpickler(f).load()
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(d)
