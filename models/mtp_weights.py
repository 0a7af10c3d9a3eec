"""Multi-token prediction weights between DeepSeek-V3's files and the model.

DeepSeek-V3's release stores MTP module k as one more decoder layer, `model.layers.<L + k>.*` (L =
num_hidden_layers), with `enorm`, `hnorm`, `eh_proj` and `shared_head.norm` beside the layer's own tensors, and
copies of the embedding and LM head (`embed_tokens.weight`, `shared_head.head.weight`). graphllm keeps the modules
apart from the decoder's layers, as `model.mtp.<k>.*` (models/decoder.py MtpLayer), and shares the embedding and
head: on load the layers past L are renamed (the copies dropped; modules past cfg.mtp_layers dropped, as
transformers drops them all), on save renamed back, with the copies written again (inference stacks that run
the MTP modules read them there).
"""

from __future__ import annotations

import re

import torch

from .config import ModelConfig

_FILE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MODEL = re.compile(r"^model\.mtp\.(\d+)\.(.+)$")
COPIES = ("embed_tokens.weight", "shared_head.head.weight")
"""Tensors the release repeats under each MTP layer: the main model's embedding and LM head."""


def mtp_from_files(sd: dict[str, torch.Tensor], cfg: ModelConfig | None) -> dict[str, torch.Tensor]:
    """`sd` with the MTP layers past the decoder's under graphllm's names (other names unchanged)."""
    if cfg is None:
        return sd
    L = cfg.num_hidden_layers
    mtp_layers = _mtp_file_layers(sd)
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        m = _FILE.match(name)
        layer = int(m.group(1)) if m else -1
        if layer < L or layer not in mtp_layers:
            out[name] = t  # a decoder layer, or a layer past L that is no MTP module: check_state_dict names it
        elif layer - L < cfg.mtp_layers and m.group(2) not in COPIES:
            out[f"model.mtp.{layer - L}.{m.group(2)}"] = t
    return out


def _mtp_file_layers(sd: dict[str, torch.Tensor]) -> set[int]:
    return {int(m.group(1)) for k in sd if (m := _FILE.match(k)) and m.group(2) == "eh_proj.weight"}


def mtp_modules_in_files(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> int:
    """How many MTP modules `sd` (tensors under the files' names) holds: layers L, L + 1, ... with an eh_proj."""
    layers, n = _mtp_file_layers(sd), 0
    while cfg.num_hidden_layers + n in layers:
        n += 1
    return n


def mtp_file_name(name: str, cfg: ModelConfig | None) -> str:
    """The file name of a model tensor: model.mtp.<k>.X is model.layers.<L + k>.X, others unchanged."""
    m = _MODEL.match(name) if cfg is not None and cfg.mtp_layers else None
    return f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}" if m else name


def mtp_copy_names(name: str, cfg: ModelConfig | None) -> list[str]:
    """The file names of the release's copies of model tensor `name` (the embedding or the LM head) under each MTP
    layer; none for other tensors or without MTP modules. A tied head is copied from the embedding."""
    if cfg is None or not cfg.mtp_layers:
        return []
    copies = {"model.embed_tokens.weight": COPIES if cfg.tie_word_embeddings else COPIES[:1],
              "lm_head.weight": () if cfg.tie_word_embeddings else COPIES[1:]}.get(name, ())
    L = cfg.num_hidden_layers
    return [f"model.layers.{L + k}.{c}" for k in range(cfg.mtp_layers) for c in copies]
