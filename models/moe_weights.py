"""Expert weights between transformers' files and the model: per-expert tensors on disk, 3D tensors in memory.

transformers 5.x keeps each MoE layer's experts as two 3D parameters (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]) and so does graphllm (models/moe.py), but `save_pretrained` writes, and
older checkpoints hold, one tensor per expert and projection:

    mixtral    model.layers.N.block_sparse_moe.experts.e.{w1 (gate), w3 (up), w2 (down)}.weight,
               model.layers.N.block_sparse_moe.gate.weight (the router)
    qwen3_moe,  model.layers.N.mlp.experts.e.{gate_proj, up_proj, down_proj}.weight, model.layers.N.mlp.gate.weight
    deepseek_v3 (DeepSeek-V3 adds mlp.gate.e_score_correction_bias and mlp.shared_experts.*, which pass through)

`experts_from_files` stacks them on load (the 3D names pass through unchanged), `experts_to_files` cuts the
3D tensors back on save, bit for bit, so HF → graphllm → HF round-trips exactly.
"""

from __future__ import annotations

import re

import torch

from .config import ModelConfig
from .mtp_weights import mtp_copy_names, mtp_file_name

_PROJ = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
         "deepseek_v3": ("mlp", "gate_proj", "up_proj", "down_proj")}
_EXPERT = re.compile(r"^(.*layers\.\d+\.)(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")
_ROUTER = re.compile(r"^(.*layers\.\d+\.)block_sparse_moe\.gate\.weight$")
_STACKED = re.compile(r"^(.*layers\.\d+\.)mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)$")


def _moe(cfg: ModelConfig | None) -> tuple[str, str, str, str] | None:
    return _PROJ.get(cfg.model_type) if cfg is not None else None


def experts_from_files(sd: dict[str, torch.Tensor], cfg: ModelConfig | None) -> dict[str, torch.Tensor]:
    """`sd` with per-expert tensors stacked into the model's 3D ones (a layer lacking some expert is left as
    it is, so the strict checkpoint check names the odd tensor)."""
    proj = _moe(cfg)
    if proj is None:
        return sd
    block, gate, up, down = proj
    per_layer: dict[str, dict[tuple[int, str], str]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        m = _EXPERT.match(name)
        if m and m.group(2) == block and m.group(4) in (gate, up, down):
            per_layer.setdefault(m.group(1), {})[(int(m.group(3)), m.group(4))] = name
            continue
        m = _ROUTER.match(name)
        out[f"{m.group(1)}mlp.gate.weight" if m and block == "block_sparse_moe" else name] = t
    E = cfg.num_experts
    for prefix, names in per_layer.items():
        if set(names) != {(e, p) for e in range(E) for p in (gate, up, down)}:
            out.update({n: sd[n] for n in names.values()})
            continue
        out[f"{prefix}mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat((sd[names[(e, gate)]], sd[names[(e, up)]]), dim=0) for e in range(E)])  # [E, 2I, H]
        out[f"{prefix}mlp.experts.down_proj"] = torch.stack([sd[names[(e, down)]] for e in range(E)])  # [E, H, I]
    return out


def file_names(name: str, cfg: ModelConfig | None) -> list[str]:
    """The names in transformers' files of the model tensor `name` (itself when it is neither an expert tensor nor
    an MTP module's, models/mtp_weights.py)."""
    if copies := mtp_copy_names(name, cfg):
        return [name, *copies]
    name = mtp_file_name(name, cfg)
    proj = _moe(cfg)
    m = _STACKED.match(name) if proj is not None else None
    if m is None:
        return [name]
    block, gate, up, down = proj
    prefix, what = m.group(1), m.group(2)
    if what == "gate.weight":
        return [f"{prefix}{block}.gate.weight"]
    parts = (gate, up) if what == "experts.gate_up_proj" else (down,)
    return [f"{prefix}{block}.experts.{e}.{p}.weight" for e in range(cfg.num_experts) for p in parts]


def experts_to_files(sd: dict[str, torch.Tensor], cfg: ModelConfig | None) -> dict[str, torch.Tensor]:
    """`sd` (HF in-memory names) with the 3D expert tensors cut into transformers' per-expert file tensors (and MTP
    modules under their file names)."""
    if _moe(cfg) is None and not (cfg is not None and cfg.mtp_layers):
        return sd
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        names = file_names(name, cfg)
        if names == [name]:
            out[name] = t
        elif len(names) == 1:  # the router or an MTP module's tensor, renamed
            out[names[0]] = t
        elif names[0] == name:  # the embedding or head, and its copies under the MTP layers (safetensors wants
            out.update({n: t if n == name else t.clone() for n in names})  # tensors that share no memory)
        elif name.endswith("gate_up_proj"):  # [E, 2I, H] → per expert gate [I, H], up [I, H]
            pieces = [half.contiguous() for e in range(t.shape[0]) for half in t[e].chunk(2, dim=0)]
            out.update(zip(names, pieces))
        else:  # down_proj [E, H, I] → per expert [H, I]
            out.update(zip(names, (t[e].contiguous() for e in range(t.shape[0]))))
    return out
