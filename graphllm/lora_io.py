"""LoRA adapters in and out of graphllm: PEFT's format, merged HF models, merged models for inference.

graphllm keeps an adapter as two Parameters beside the layer they adapt, `<module>.lora_A` [r, in] and
`<module>.lora_B` [out, r] (passes/lora.py), in the same checkpoints as every other parameter; PEFT keeps them
as `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` in `adapter_model.safetensors` beside an
`adapter_config.json`. Both compute y = x Wᵀ + (x Aᵀ Bᵀ)·s with s = alpha / r (alpha / √r with rsLoRA).

- `lora_to_peft(CKPT, OUT)`: a graphllm LoRA checkpoint → a PEFT adapter directory (`PeftModel.from_pretrained`).
- `peft_to_graphllm(ADAPTER, HF, OUT)`: a PEFT adapter + its base → `OUT/step_0`, a weights-only checkpoint
  (base + adapters) that `graphllm run ARTIFACT --load OUT` starts from (ARTIFACT compiled with the lora flags
  it prints).
- `merge_lora(CKPT_OR_ADAPTER, HF, OUT)`: W + (B A)·s for every adapted layer, written by
  graphllm.convert.graphllm_to_hf: a plain model transformers loads (what PEFT's merge_and_unload gives).
- `merged_model(MODEL, ADAPTERS)`: the base model with the adapters merged, for generate/chat/eval.

An adapter whose layers or shapes the base does not have is refused with the first mismatch, before anything is
written. The LoRA settings (rank, alpha, rsLoRA, dropout) of a graphllm checkpoint come from its marker's
"lora" entry; `alpha`/`rslora` given here fill in for a checkpoint saved without one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graphllm.errors import GraphllmError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
FACTORS = ("lora_A", "lora_B")


@dataclass(kw_only=True)
class Adapters:
    """LoRA factors by module path (`model.layers.0.self_attn.q_proj` -> (A [r, in], B [out, r])) and settings."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    alpha: float
    rslora: bool = False
    dropout: float = 0.0
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


# -- reading ---------------------------------------------------------------------------------------------
def is_peft_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapters(path: str | os.PathLike[str], *, alpha: float | None = None, rslora: bool | None = None) -> Adapters:
    """Adapters from a PEFT adapter directory or a graphllm checkpoint (a step directory or its root)."""
    return read_peft(path) if is_peft_dir(path) else read_checkpoint(path, alpha=alpha, rslora=rslora)


def _settings(marker: dict, path: Path, alpha: float | None, rslora: bool | None) -> tuple[float | None, bool, float]:
    saved = marker.get("lora") if isinstance(marker.get("lora"), dict) else {}
    rank = saved.get("rank")
    saved_alpha = saved.get("alpha") if saved.get("alpha") is not None else (2.0 * rank if rank else None)
    alpha = alpha if alpha is not None else saved_alpha
    return alpha, bool(rslora if rslora is not None else saved.get("rslora", False)), float(saved.get("dropout", 0.0))


def read_checkpoint(ckpt: str | os.PathLike[str], *, alpha: float | None = None, rslora: bool | None = None) -> Adapters:
    """The `*.lora_A` / `*.lora_B` parameters of a graphllm checkpoint (newest complete step under a root)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from graphllm.convert import _resolve_ckpt
    from graphllm.parallel.checkpoint import MARKER, load_checkpoint

    path = _resolve_ckpt(Path(ckpt).expanduser().resolve())
    marker = json.loads((path / MARKER).read_text())
    md = FileSystemReader(path).read_metadata().state_dict_metadata
    names = sorted(k.removeprefix("model/") for k, e in md.items()
                   if k.startswith("model/") and k.rsplit(".", 1)[-1] in FACTORS and isinstance(e, TensorStorageMetadata))
    if not names:
        raise GraphllmError(f"--ckpt {path} holds no LoRA adapters (no *.lora_A / *.lora_B parameters); it comes from "
                            "a run compiled without --lora-rank")
    part = {k: torch.empty(md[f"model/{k}"].size, dtype=md[f"model/{k}"].properties.dtype) for k in names}
    load_checkpoint(path, named_params=part, want_optim=False, st=None, expect_fingerprint=None)
    factors = _pair(part, str(path))
    alpha, rs, dropout = _settings(marker, path, alpha, rslora)
    if alpha is None:
        raise GraphllmError(f"--ckpt {path} does not record its LoRA settings; pass --lora-alpha (and --lora-rslora if "
                            "the run used it) as given to `graphllm compile`")
    return Adapters(factors=factors, rank=_rank(factors, str(path)), alpha=float(alpha), rslora=rs, dropout=dropout,
                    source=str(path))


def _pair(flat: dict[str, torch.Tensor], source: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`<module>.lora_A` / `<module>.lora_B` tensors → {module: (A, B)}; each A needs its B."""
    modules = sorted({k.rsplit(".", 1)[0] for k in flat})
    out = {}
    for m in modules:
        a, b = flat.get(f"{m}.lora_A"), flat.get(f"{m}.lora_B")
        if a is None or b is None:
            raise GraphllmError(f"{source}: {m} has only one of lora_A / lora_B; the adapter is incomplete")
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise GraphllmError(f"{source}: {m} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which are not "
                                "[r, in] and [out, r]")
        out[m] = (a, b)
    return out


def _rank(factors: dict, source: str) -> int:
    ranks = sorted({a.shape[0] for a, _ in factors.values()})
    if len(ranks) != 1:
        raise GraphllmError(f"{source}: adapters of ranks {ranks}; graphllm uses one rank for every layer")
    return ranks[0]


def read_peft(adapter_dir: str | os.PathLike[str]) -> Adapters:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), plain LoRA only."""
    from safetensors.torch import load_file

    d = Path(adapter_dir).expanduser().resolve()
    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    unsupported = [k for k, bad in (("peft_type", cfg.get("peft_type") != "LORA"), ("use_dora", cfg.get("use_dora")),
                                    ("fan_in_fan_out", cfg.get("fan_in_fan_out")),
                                    ("bias", cfg.get("bias", "none") != "none"),
                                    ("modules_to_save", cfg.get("modules_to_save")),
                                    ("rank_pattern", cfg.get("rank_pattern")), ("alpha_pattern", cfg.get("alpha_pattern")))
                   if bad]
    if unsupported:
        raise GraphllmError(f"{d / ADAPTER_CONFIG}: {unsupported[0]}={cfg.get(unsupported[0])!r} is not plain LoRA; "
                            "graphllm reads LoRA adapters with one rank and alpha and no bias, DoRA or extra modules")
    if not (d / ADAPTER_WEIGHTS).is_file():
        raise GraphllmError(f"{d} has no {ADAPTER_WEIGHTS}; save the adapter with safetensors (PEFT's default)")
    flat = {}
    for key, t in load_file(str(d / ADAPTER_WEIGHTS)).items():
        name = key.removeprefix(PEFT_PREFIX).removesuffix(".weight").replace(".lora_A.default", ".lora_A") \
            .replace(".lora_B.default", ".lora_B")
        if name.rsplit(".", 1)[-1] not in FACTORS:
            raise GraphllmError(f"{d / ADAPTER_WEIGHTS} has tensor {key}, which is not a LoRA factor of a linear layer")
        flat[name] = t
    factors = _pair(flat, str(d))
    return Adapters(factors=factors, rank=_rank(factors, str(d)), alpha=float(cfg.get("lora_alpha", 8)),
                    rslora=bool(cfg.get("use_rslora", False)), dropout=float(cfg.get("lora_dropout", 0.0)), source=str(d))


# -- checking against a base model ---------------------------------------------------------------------
def check_base(adapters: Adapters, weights: dict[str, torch.Size | tuple[int, ...]], base: str) -> None:
    """Refuse adapters for another model: the first module the base lacks, or whose shape disagrees."""
    for module, (a, b) in sorted(adapters.factors.items()):
        shape = weights.get(f"{module}.weight")
        if shape is None:
            raise GraphllmError(f"adapter {adapters.source} adapts {module}, which {base} does not have; it was trained "
                                "on another base model")
        out_f, in_f = tuple(shape)
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise GraphllmError(f"adapter {adapters.source} has {module} for {a.shape[1]}→{b.shape[0]} features, but "
                                f"{base}'s {module} is {in_f}→{out_f}; it was trained on another base model")


def merge_into(state: dict[str, torch.Tensor], adapters: Adapters) -> dict[str, torch.Tensor]:
    """W + (B A)·s for each adapted layer (PEFT's merge: the delta in fp32 on CPU for 16-bit factors, added as
    `weight += delta`, i.e. in the promoted dtype, then stored in W's dtype); other tensors unchanged."""
    out = dict(state)
    for module, (a, b) in adapters.factors.items():
        w = state[f"{module}.weight"]
        a, b = a.to(w.device), b.to(w.device)
        if w.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16):
            delta = ((b.float() @ a.float()) * adapters.scale).to(b.dtype)
        else:
            delta = (b @ a) * adapters.scale
        out[f"{module}.weight"] = w.add(delta).to(w.dtype)
    return out


def merged_model(model: str, adapter_path: str | os.PathLike[str], *, seed: int = 0):
    """`load_model(model)` with the adapters at `adapter_path` (PEFT dir or graphllm checkpoint) merged in."""
    from graphllm.models import load_model

    net = load_model(model, seed=seed)
    adapters = read_adapters(adapter_path)
    own = net.state_dict()
    check_base(adapters, {k: v.shape for k, v in own.items()}, model)
    merged = merge_into({f"{m}.weight": own[f"{m}.weight"] for m in adapters.factors}, adapters)
    with torch.no_grad():
        for name, value in merged.items():
            own[name].copy_(value)
    return net


# -- writing ------------------------------------------------------------------------------------------------
def peft_targets(modules: list[str], all_linears: list[str]) -> list[str]:
    """PEFT `target_modules` naming exactly `modules`: their last components when those pick no other linear of
    the base, else the full module paths (PEFT matches a target equal to a path or ending in ".target")."""
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    picked = {m for m in all_linears if m.rsplit(".", 1)[-1] in short}
    return short if picked == set(modules) else sorted(modules)


def write_peft(adapters: Adapters, out: str | os.PathLike[str], *, base_model: str | None, all_linears: list[str],
               force: bool = False) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` into `out` (atomically: a temp dir renamed)."""
    from safetensors.torch import save_file

    from graphllm.convert import _check_hf_out, _install_hf
    from graphllm.output_dir import temp_dir_beside, umask_modes

    dest = Path(out).expanduser().resolve()
    _check_hf_out(dest, force)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": adapters.rank, "lora_alpha": adapters.alpha, "lora_dropout": adapters.dropout,
              "use_rslora": adapters.rslora, "target_modules": peft_targets(sorted(adapters.factors), all_linears),
              "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "use_dora": False}
    tensors = {f"{PEFT_PREFIX}{m}.{name}.weight": t.detach().contiguous().cpu()
               for m, (a, b) in sorted(adapters.factors.items()) for name, t in (("lora_A", a), ("lora_B", b))}
    tmp = temp_dir_beside(dest)
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        umask_modes(tmp)
        if dest.exists() and any(dest.iterdir()):
            for f in tmp.iterdir():
                os.replace(f, dest / f.name)
        else:
            _install_hf(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -- the three conversions ---------------------------------------------------------------------------------
def _base(hf: str | os.PathLike[str], *, values: bool):
    """(ModelConfig, HF dir, {name: tensor}) of a base model directory (meta tensors unless `values`)."""
    from graphllm.convert import _meta_model
    from graphllm.models import load_config, read_hf_state_dict
    from graphllm.models.weights import CONFIG_FILE, check_state_dict

    d = Path(hf).expanduser().resolve()
    if not (d / CONFIG_FILE).is_file():
        raise GraphllmError(f"--hf {d}: not a Hugging Face model directory (no {CONFIG_FILE}); point it at the base model")
    cfg = load_config(d)
    meta = _meta_model(cfg)
    if not values:
        return cfg, d, {k: v for k, v in meta.state_dict().items()}
    return cfg, d, check_state_dict(meta, read_hf_state_dict(d), str(d))


def _linears(cfg) -> list[str]:
    from graphllm.convert import _meta_model

    return [n for n, m in _meta_model(cfg).named_modules() if isinstance(m, torch.nn.Linear)]


def lora_settings(adapters: Adapters, cfg) -> dict:
    """The plan's lora section (to_dict form) that reproduces `adapters` on this model."""
    targets = peft_targets(sorted(adapters.factors), _linears(cfg))
    return {"rank": adapters.rank, "alpha": adapters.alpha, "dropout": adapters.dropout, "target": targets,
            "rslora": adapters.rslora, "qlora": False}


def compile_flags(settings: dict) -> str:
    flags = f"--lora-rank {settings['rank']} --lora-alpha {settings['alpha']:g} --lora-target {','.join(settings['target'])}"
    return flags + (" --lora-rslora" if settings["rslora"] else "")


def lora_to_peft(ckpt: str | os.PathLike[str], out: str | os.PathLike[str], *, alpha: float | None = None,
                 rslora: bool | None = None, force: bool = False) -> tuple[Path, Adapters]:
    """A graphllm LoRA checkpoint → a PEFT adapter directory for the model the run was compiled from."""
    from graphllm.convert import _config_and_files, _meta_model
    from graphllm.parallel.checkpoint import MARKER

    adapters = read_checkpoint(ckpt, alpha=alpha, rslora=rslora)
    path = Path(adapters.source)
    dest = Path(out).expanduser().resolve()
    if dest == path or path in dest.parents:
        raise GraphllmError(f"--out {dest} is inside the checkpoint {path}; write the adapter elsewhere")
    marker = json.loads((path / MARKER).read_text())
    cfg, _ = _config_and_files(path, marker)
    check_base(adapters, {k: v.shape for k, v in _meta_model(cfg).state_dict().items()}, "the checkpoint's model")
    return write_peft(adapters, dest, base_model=marker.get("model"), all_linears=_linears(cfg), force=force), adapters


def _write_weights_checkpoint(step: Path, named: dict[str, torch.Tensor], cfg, hf: Path, extra_meta: dict) -> None:
    """A weights-only graphllm checkpoint at `step` (graphllm.resume.WEIGHTS_ONLY) carrying the HF dir's files."""
    from graphllm.convert import (CONFIG_FILE, GENERATION_CONFIG, HF_SUBDIR, TOKENIZER_FILES, _present,
                                  umask_modes)
    from graphllm.parallel.checkpoint import save_checkpoint
    from graphllm.resume import WEIGHTS_ONLY, weights_fingerprint
    from graphllm.version import __version__

    meta = {"kind": WEIGHTS_ONLY, "fingerprint": weights_fingerprint(cfg), "model": str(hf), "config": cfg.to_dict(),
            "graphllm": __version__, **extra_meta}
    save_checkpoint(step, step=0, named_params=named, optim_state=None, extra={}, meta=meta, st=None)
    (step / HF_SUBDIR).mkdir()
    for name in _present(hf, (CONFIG_FILE, GENERATION_CONFIG, *TOKENIZER_FILES)):
        shutil.copy2(hf / name, step / HF_SUBDIR / name)
    umask_modes(step)


def peft_to_graphllm(adapter_dir: str | os.PathLike[str], hf: str | os.PathLike[str],
                     out: str | os.PathLike[str]) -> tuple[Path, dict]:
    """A PEFT adapter and its base → OUT/step_0 (base + adapters, weights only); returns it and the lora
    settings to compile with (`compile_flags`)."""
    from graphllm.convert import CONVERTED_STEP, _nonempty_dir, temp_dir_beside

    if not is_peft_dir(adapter_dir):
        raise GraphllmError(f"--adapter {adapter_dir}: no {ADAPTER_CONFIG}; point it at a PEFT adapter directory")
    adapters = read_peft(adapter_dir)
    cfg, d, sd = _base(hf, values=True)
    check_base(adapters, {k: v.shape for k, v in sd.items()}, str(d))
    root = Path(out).expanduser().resolve()
    if _nonempty_dir(root, "--out"):
        raise GraphllmError(f"--out {root} exists and is not empty; choose a new checkpoint root")
    settings = lora_settings(adapters, cfg)
    named = {**sd, **{f"{m}.{n}": t for m, ab in adapters.factors.items() for n, t in zip(FACTORS, ab)}}
    tmp = temp_dir_beside(root)
    try:
        _write_weights_checkpoint(tmp / CONVERTED_STEP, named, cfg, d, {"lora": settings, "adapter": str(adapter_dir)})
        os.rename(tmp, root)  # rename(2) replaces an empty directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / CONVERTED_STEP, settings


def merge_lora(src: str | os.PathLike[str], hf: str | os.PathLike[str], out: str | os.PathLike[str], *,
               dtype: str | None = None, max_shard_size: str | int = "5GB", force: bool = False,
               alpha: float | None = None, rslora: bool | None = None):
    """Adapters (graphllm checkpoint or PEFT dir) merged into the base at `hf`, written as an HF directory by
    graphllm.convert.graphllm_to_hf (through a temporary weights-only checkpoint beside `out`)."""
    from graphllm.convert import CONVERTED_STEP, _check_hf_out, temp_dir_beside, graphllm_to_hf

    adapters = read_adapters(src, alpha=alpha, rslora=rslora)
    cfg, d, sd = _base(hf, values=True)
    check_base(adapters, {k: v.shape for k, v in sd.items()}, str(d))
    dest = Path(out).expanduser().resolve()
    _check_hf_out(dest, force)
    tmp = temp_dir_beside(dest)
    try:
        _write_weights_checkpoint(tmp / CONVERTED_STEP, merge_into(sd, adapters), cfg, d, {})
        result = graphllm_to_hf(tmp / CONVERTED_STEP, dest, dtype=dtype, max_shard_size=max_shard_size, force=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result, adapters
