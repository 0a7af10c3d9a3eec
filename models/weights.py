"""Read and write Hugging Face safetensors checkpoints for LlamaForCausalLM.

Loading is strict: every parameter must come from the checkpoint with the right shape, and every
checkpoint tensor must land somewhere, so a checkpoint for another model fails loudly instead of
half-loading. Saving writes config.json + model.safetensors that transformers' from_pretrained reads.

Where HF fuses projections (Phi-3 `qkv_proj` and `gate_up_proj`, GLM-4 `gate_up_proj`) the model keeps them
apart (q/k/v_proj, gate/up_proj), so tensor parallelism, LoRA and the fusion passes see the llama layout:
`split_fused` cuts them on load and `fuse_for_hf` concatenates them back on save, bit for bit. MoE experts are
3D tensors in the model and per-expert tensors in the files (models/moe_weights.py), mapped the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from graphllm.errors import GraphllmError

from .config import ModelConfig
from .moe_weights import experts_from_files, experts_to_files, file_names
from .mtp_weights import mtp_from_files

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # old HF checkpoints saved the RoPE buffer


def _fused_modules(cfg: ModelConfig | None) -> dict[str, tuple[tuple[str, int], ...]]:
    """HF fused module (relative to a layer) -> its parts (internal module, rows), in HF's concatenation order."""
    if cfg is None or cfg.model_type not in ("phi3", "glm4"):
        return {}
    q, kv, inter = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    out = {"mlp.gate_up_proj": (("mlp.gate_proj", inter), ("mlp.up_proj", inter))}
    if cfg.model_type == "phi3":
        out["self_attn.qkv_proj"] = (("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv))
    return out


def _layer_key(name: str) -> tuple[str, str, str] | None:
    """"model.layers.3.mlp.gate_up_proj.weight" -> ("model.layers.3.", "mlp.gate_up_proj", "weight")."""
    head, sep, rest = name.partition("layers.")
    index, dot, module = rest.partition(".")
    if not sep or not dot or not index.isdigit():
        return None
    module, _, leaf = module.rpartition(".")
    return f"{head}layers.{index}.", module, leaf


def split_fused(sd: dict[str, torch.Tensor], cfg: ModelConfig | None) -> dict[str, torch.Tensor]:
    """`sd` with HF's fused projections cut into the model's separate ones (others unchanged)."""
    fused = _fused_modules(cfg)
    if not fused:
        return sd
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        key = _layer_key(name)
        parts = fused.get(key[1]) if key else None
        if parts is None or t.shape[0] != sum(rows for _, rows in parts):
            out[name] = t  # not fused, or of another size: check_state_dict names it
            continue
        for (module, _), piece in zip(parts, torch.split(t, [rows for _, rows in parts], dim=0)):
            out[f"{key[0]}{module}.{key[2]}"] = piece
    return out


def hf_names(names: list[str], cfg: ModelConfig | None) -> dict[str, list[str]]:
    """HF file tensor name -> the model's tensor names it is made of (one, the parts of a fused projection, or
    the 3D expert tensor that a per-expert tensor is cut from)."""
    fused = _fused_modules(cfg)
    part_of = {module: (hf, i) for hf, parts in fused.items() for i, (module, _) in enumerate(parts)}
    out: dict[str, list[str]] = {}
    for name in names:
        key = _layer_key(name)
        if key is None or key[1] not in part_of:
            out.update((file, [name]) for file in file_names(name, cfg))
            continue
        hf, i = part_of[key[1]]
        group = out.setdefault(f"{key[0]}{hf}.{key[2]}", [""] * len(fused[hf]))
        group[i] = name
    return out


def fuse_for_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig | None) -> dict[str, torch.Tensor]:
    """The model's tensors under HF's names: fused projections concatenated back (inverse of split_fused)."""
    groups = hf_names(list(sd), cfg)
    if all(len(parts) == 1 for parts in groups.values()):
        return sd
    # a one-part group keeps the model's name: in-memory HF names (expert tensors are cut by experts_to_files)
    return {parts[0] if len(parts) == 1 else hf: sd[parts[0]] if len(parts) == 1 else torch.cat([sd[p] for p in parts], dim=0)
            for hf, parts in groups.items()}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise GraphllmError(f"{path} is not a readable safetensors file ({e}); re-download or re-save "
                            "the checkpoint") from e


def read_hf_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory: model.safetensors, or the shards its index names."""
    root = Path(path)
    single, index = root / SINGLE_FILE, root / INDEX_FILE
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise GraphllmError(f"{index} is not a safetensors index (no valid 'weight_map'): {e}") from None
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = root / shard
            if not shard_path.is_file():
                raise GraphllmError(
                    f"shard {shard} named in {index} is missing; re-download or re-save the checkpoint"
                )
            sd.update(_load_safetensors(shard_path))
        return sd
    others = sorted(p.name for p in root.glob("*.bin")) if root.is_dir() else []
    hint = f" (found {', '.join(others)}: convert it to safetensors)" if others else ""
    raise GraphllmError(f"{root} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def load_state_dict_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy `sd` into `model`'s parameters (cast to their dtype), strictly; `source` is named in errors."""
    own = model.state_dict(keep_vars=True)
    sd = check_state_dict(model, sd, source)
    with torch.no_grad():
        for name, value in sd.items():
            own[name].copy_(value)


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """`sd` restricted to `model`'s own tensors, after checking it matches them name for name and shape for
    shape (a tied lm_head.weight must equal the embedding and is dropped; old RoPE buffers are ignored).

    Reads only names and shapes of `model`, so a model built on the meta device is enough. HF's fused
    projections are split first (split_fused) for the model's config."""
    cfg = getattr(model, "config", None)
    sd = mtp_from_files(experts_from_files(split_fused(sd, cfg), cfg), cfg)
    own = model.state_dict(keep_vars=True)  # name -> Parameter; a tied lm_head appears under both names
    tied = "lm_head.weight" in own and own["lm_head.weight"] is own.get("model.embed_tokens.weight")
    sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    head, embed = sd.get("lm_head.weight"), sd.get("model.embed_tokens.weight")
    both = tied and head is not None and embed is not None and not head.is_meta  # meta: shapes only, no values
    if both and not torch.equal(head, embed):
        raise GraphllmError(
            f"{source} has an lm_head.weight different from model.embed_tokens.weight, but the config sets "
            f"tie_word_embeddings=true; set it to false in config.json if the checkpoint is untied"
        )
    if tied:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        own = {k: v for k, v in own.items() if k != "lm_head.weight"}

    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise GraphllmError(
            f"{source} has tensor {unexpected[0]} (shape {tuple(sd[unexpected[0]].shape)}) that the model does not "
            f"have ({len(unexpected)} unexpected in all); a checkpoint for another model, or a config.json that "
            f"does not match it?"
        )
    missing = sorted(set(own) - set(sd))
    if missing:
        raise GraphllmError(
            f"{source} lacks tensor {missing[0]} (model shape {tuple(own[missing[0]].shape)}; {len(missing)} missing "
            f"in all); a checkpoint for another model, or a truncated checkpoint?"
        )
    for name, param in own.items():
        value = sd[name]
        if tuple(value.shape) != tuple(param.shape):
            raise GraphllmError(
                f"tensor {name} in {source} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}; "
                f"a checkpoint for another model, or a config.json of another size?"
            )
    return {name: sd[name] for name in own}


def save_hf(model: nn.Module, cfg: ModelConfig, out_dir: str | os.PathLike[str]) -> Path:
    """Write config.json + model.safetensors into out_dir atomically (replacing it if present); returns it.

    Files are written into a temp dir beside out_dir and renamed into place, so a crash never leaves a
    half-written checkpoint under out_dir.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # HF ties it back on load
    sd = experts_to_files(fuse_for_hf(sd, cfg), cfg)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(sd, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        hf = cfg.to_hf()
        hf["dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # as transformers' max_shard_size


def parse_size(text: str | int, *, what: str = "--max-shard-size") -> int:
    """Bytes in "5GB", "500MB", "2GiB" or a plain integer; `what` is named in the error."""
    if isinstance(text, int):
        value, unit = text, ""
    else:
        head = str(text).strip().upper()
        number = head.rstrip("KMGTIB")
        value, unit = number, head[len(number):]
    try:
        size = int(float(value) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        size = 0
    if size <= 0:
        raise GraphllmError(f"{what} {text!r} is not a size; give bytes or a number with KB/MB/GB/KiB/MiB/GiB")
    return size


def shard_file_names(sd: dict[str, torch.Tensor], max_shard_bytes: int) -> dict[str, str]:
    """Tensor name -> file, as transformers names them: one model.safetensors when everything fits in
    `max_shard_bytes`, else model-0000i-of-0000n.safetensors filled in `sd`'s order (a tensor larger than
    the limit gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, t in sd.items():
        size = t.numel() * t.element_size()
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    if len(shards) == 1:
        return {name: SINGLE_FILE for name in shards[0]}
    n = len(shards)
    return {name: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, names in enumerate(shards) for name in names}


def write_safetensors(sd: dict[str, torch.Tensor], out_dir: Path, *, max_shard_bytes: int,
                      materialize: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
                      cfg: ModelConfig | None = None) -> list[str]:
    """Write `sd` into `out_dir` (a fresh directory) as HF does: model.safetensors, or shards plus
    model.safetensors.index.json (total_size = bytes of all tensors). Returns the file names written.

    With `materialize`, `sd` may hold meta tensors (names, shapes and dtypes only): it is called with
    one shard's names at a time and returns their real tensors, so one shard at a time is in memory.
    With `cfg`, `sd` holds the model's names and HF's fused projections are written (fuse_for_hf)."""
    groups = hf_names(list(sd), cfg)
    if any(parts != [hf] for hf, parts in groups.items()):
        model_sd, inner = sd, materialize
        sd = experts_to_files(fuse_for_hf(sd, cfg), cfg)

        def materialize(names: list[str]) -> dict[str, torch.Tensor]:  # HF names -> their real (fused) tensors
            wanted = list(dict.fromkeys(p for n in names for p in groups[n]))
            real = inner(wanted) if inner is not None else model_sd
            return experts_to_files(fuse_for_hf({p: real[p] for p in wanted}, cfg), cfg)
    where = shard_file_names(sd, max_shard_bytes)
    files = list(dict.fromkeys(where.values()))
    for file in files:
        names = [k for k in sd if where[k] == file]
        real = materialize(names) if materialize is not None else sd
        part = {k: real[k].detach().contiguous().cpu() for k in names}
        assert all(part[k].dtype == sd[k].dtype and part[k].shape == sd[k].shape for k in names), file
        save_file(part, str(out_dir / file), metadata={"format": "pt"})
        del part, real
    if len(files) > 1:
        total = sum(t.numel() * t.element_size() for t in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(where.items()))}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        files.append(INDEX_FILE)
    return files
