"""build_model / load_model: a ModelConfig, preset name or HF checkpoint directory -> LlamaForCausalLM."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Literal

import torch

from graphllm.errors import GraphllmError

from .config import ModelConfig
from .llama import LlamaForCausalLM
from .hub import resolve_model
from .presets import PRESETS
from .moe_weights import experts_from_files
from .mtp_weights import mtp_from_files
from .weights import CONFIG_FILE, load_state_dict_into, read_hf_state_dict, split_fused

log = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A randomly initialised model (init_weights(seed), drawn in float32) cast to `dtype`."""
    model = LlamaForCausalLM(cfg)
    model.init_weights(seed)
    return model.to(dtype)


def load_config(name_or_path: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig of a preset or HF directory, without building the model (for plan checks)."""
    name = resolve_model(os.fspath(name_or_path), tuple(PRESETS))  # a Hub id: its cached snapshot
    if name in PRESETS:
        return PRESETS[name]()
    path = Path(name).expanduser()
    if not (path.is_dir() and (path / CONFIG_FILE).is_file()):
        raise GraphllmError(f"{name!r} is neither a preset ({', '.join(PRESETS)}), a directory with config.json, "
                            "nor a Hub id org/name")
    try:
        hf = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise GraphllmError(f"{path / CONFIG_FILE} is not valid JSON: {e}") from None
    return ModelConfig.from_hf(hf, source=str(path / CONFIG_FILE))


def _with_mtp(model: LlamaForCausalLM, sd: dict[str, torch.Tensor], seed: int, source: str) -> dict[str, torch.Tensor]:
    """`sd` under the model's names, with each MTP module the checkpoint lacks drawn from `seed` (init_mtp)."""
    cfg = model.config
    sd = mtp_from_files(experts_from_files(split_fused(sd, cfg), cfg), cfg)
    for k in range(cfg.mtp_layers):
        prefix = f"model.mtp.{k}."
        if not any(name.startswith(prefix) for name in sd):
            model.init_mtp(k, seed)
            sd.update({prefix + n: t for n, t in model.model.mtp[k].state_dict().items()})
            log.warning("%s has no weights for multi-token prediction module %d (model.layers.%d.*): drawn from "
                        "seed %d", source, k, cfg.num_hidden_layers + k, seed)
    return sd


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: Literal["sdpa", "eager"] | None = None,
    mtp_layers: int = 0,
) -> LlamaForCausalLM:
    """A preset name -> random init with `seed`; a directory -> its config.json and safetensors weights.

    `attn_implementation` overrides the config's ("sdpa" by default). `mtp_layers`: multi-token prediction
    modules to build (models/mtp_weights.py); those the checkpoint lacks are drawn from `seed`, with a warning.
    The model has `.config` and `.source` (the preset name or the resolved checkpoint path).
    """
    name = resolve_model(os.fspath(name_or_path), tuple(PRESETS))  # a Hub id: its cached snapshot
    path = Path(name).expanduser()
    if name in PRESETS:
        cfg = dataclasses.replace(PRESETS[name](), mtp_layers=mtp_layers)
        if attn_implementation is not None:
            cfg = dataclasses.replace(cfg, attn_implementation=attn_implementation)
        model = build_model(cfg, seed=seed, dtype=dtype)
        model.source = name
        return model
    if not (path.is_dir() and (path / CONFIG_FILE).is_file()):
        why = "a directory without config.json" if path.is_dir() else "neither"
        raise GraphllmError(
            f"{name!r} is neither a preset ({', '.join(PRESETS)}), a directory with config.json ({why}), "
            "nor a Hub id org/name"
        )
    path = path.resolve()
    source = str(path)
    try:
        hf = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise GraphllmError(f"{path / CONFIG_FILE} is not valid JSON: {e}") from None
    cfg = dataclasses.replace(ModelConfig.from_hf(hf, source=str(path / CONFIG_FILE)), mtp_layers=mtp_layers)
    if attn_implementation is not None:
        cfg = dataclasses.replace(cfg, attn_implementation=attn_implementation)
    sd = read_hf_state_dict(path)
    # Built on meta (no wasted random init), then given real uninitialised storage.
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    model.post_materialize()
    if mtp_layers:
        sd = _with_mtp(model, sd, seed, source)
    model = model.to(dtype)
    load_state_dict_into(model, sd, source)
    model.source = source
    return model
