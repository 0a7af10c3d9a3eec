"""Convert between Megatron-LM checkpoints and graphllm checkpoints (docs/megatron.md).

`megatron_to_graphllm(DIR, ROOT)` reads a Megatron-Core GPT checkpoint, legacy (`mp_rank_*/model_optim_rng.pt`,
any tp x pp, virtual pipeline chunks too) or torch_dist (graphllm/megatron_io.py), and writes `ROOT/step_0`: a
weights-only graphllm checkpoint, as `graphllm convert hf-to-graphllm` does. The model is what the checkpoint's
Megatron args describe (graphllm/megatron_layout.py config_from_args); `config` (an HF config.json, a directory
holding one, or a preset) states the target model instead: it must agree with the args (the first difference is
the error) and its vocab_size drops Megatron's padding rows. Optimizer state is never converted.

`graphllm_to_megatron(CKPT, DIR, tp=, pp=)` writes Megatron-LM's legacy format, weights only, in Megatron-Core's
local-spec names (megatron-core's Transformer Engine spec needs transformer_engine, which graphllm does not
install; the two specs name only the norms differently), with the args Megatron-LM's `--use-checkpoint-args`
builds the same model from, and the graphllm model's HF config (the 'graphllm' entry), so that DIR converts
back bit for bit.

Errors are one line, found before anything is written; output goes to a temp directory beside the target,
renamed into place at the end (graphllm/convert.py's rules).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import torch

from graphllm.convert import (CONFIG_FILE, CONVERTED_STEP, GENERATION_CONFIG, HF_SUBDIR, TOKENIZER_FILES,
                              ConvertResult, _check_ckpt_out, _config_and_files, _dtype_names, _meta_model,
                              _nbytes, _nonempty_dir, _place_step, _present, _rename_new, _resolve_ckpt)
from graphllm.disk_space import writing_output
from graphllm.errors import GraphllmError
from graphllm.output_dir import temp_dir_beside, umask_modes
from graphllm.megatron_io import TRACKER, MegatronCheckpoint, read_checkpoint, write_legacy
from graphllm.megatron_layout import (check_split, check_target, config_from_args, megatron_args, padded_vocab_size,
                                      to_graphllm, to_megatron)
from graphllm.models import ModelConfig, load_config
from graphllm.models.weights import check_state_dict
from graphllm.parallel.checkpoint import MARKER, load_checkpoint, save_checkpoint, stored_parameters
from graphllm.resume import WEIGHTS_ONLY, weights_fingerprint
from graphllm.version import __version__

DEFAULT_VOCAB_MULTIPLE = 128
"""Megatron-LM's --make-vocab-size-divisible-by default."""


def megatron_to_graphllm(megatron: str | os.PathLike[str], out: str | os.PathLike[str], *,
                         config: str | os.PathLike[str] | None = None, force: bool = False) -> ConvertResult:
    """A Megatron-LM checkpoint (its --save directory or one iteration in it) -> `out/step_0`."""
    target = _read_target(config) if config is not None else None
    root = Path(out).expanduser().resolve()
    src = Path(megatron).expanduser().resolve()
    if root == src or src in root.parents:
        raise GraphllmError(f"--out {root} is inside the Megatron checkpoint {src}; write the graphllm checkpoint "
                            "elsewhere")
    notes = _check_ckpt_out(root, force)
    ckpt = read_checkpoint(src)
    cfg, hf_config, more = _model_config(ckpt, target, config)
    notes += ckpt.notes + more
    full = dict(ckpt.full)
    if cfg.tie_word_embeddings and "output_layer.weight" in full:  # the last stage's copy of the tied embedding
        head, embed = full.pop("output_layer.weight"), full.get("embedding.word_embeddings.weight")
        if embed is not None and not torch.equal(head, embed):
            notes.append("the last pipeline stage's copy of the tied embedding differs from the embedding; the "
                         "embedding was kept")
    _check_full(full, cfg, ckpt)
    sd = check_state_dict(_meta_model(cfg), to_graphllm(full, cfg), str(ckpt.path))
    meta = {"kind": WEIGHTS_ONLY, "fingerprint": weights_fingerprint(cfg), "model": str(ckpt.path),
            "config": cfg.to_dict(), "dtypes": _dtype_names(sd), "graphllm": __version__,
            "megatron": {"format": ckpt.fmt, "iteration": ckpt.iteration}}
    tmp = temp_dir_beside(root)
    try:
        with writing_output(root, _nbytes(sd)):
            step = save_checkpoint(tmp / CONVERTED_STEP, step=0, named_params=sd, optim_state=None, extra={},
                                   meta=meta, st=None)
            files = _write_hf_files(step / HF_SUBDIR, target, hf_config)
        umask_modes(step)
        _place_step(tmp, step, root, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not any(f in TOKENIZER_FILES for f in files):
        notes.append("no tokenizer files (pass --hf-config HF_DIR to carry them); graphllm-to-hf will need --tokenizer")
    return ConvertResult(path=root / CONVERTED_STEP, tensors=len(sd), parameters=sum(t.numel() for t in sd.values()),
                         nbytes=_nbytes(sd), dtypes=_dtype_names(sd), files=files, notes=notes)


def _read_target(config: str | os.PathLike[str]) -> tuple[ModelConfig, Path | None, dict | None]:
    """(the stated model, a directory whose HF files to carry, or the config.json dict to carry)."""
    p = Path(config).expanduser()
    if p.is_dir():
        return load_config(p), p, None
    if p.is_file():
        try:
            d = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GraphllmError(f"--hf-config {p} is not a readable JSON file ({e})") from None
        if not isinstance(d, dict):
            raise GraphllmError(f"--hf-config {p} holds a JSON {type(d).__name__}, not an HF config.json object")
        return ModelConfig.from_hf(d, str(p)), None, d
    if p.exists() or os.sep in str(config):
        raise GraphllmError(f"--hf-config {p}: no such file or directory; give an HF config.json or its directory")
    return load_config(str(config)), None, None  # a preset name; an unknown one gets load_config's error


def _model_config(ckpt: MegatronCheckpoint, target, flag) -> tuple[ModelConfig, dict | None, list[str]]:
    """The graphllm config of the converted model, the HF config.json dict to carry (if not --hf-config's), notes."""
    notes: list[str] = []
    stated, hf_config, what = (target[0], None, f"--hf-config {flag}") if target else (None, None, "")
    if stated is None and isinstance(ckpt.extra.get("hf_config"), dict):  # written by graphllm-to-megatron
        try:
            stated, hf_config = ModelConfig.from_hf(ckpt.extra["hf_config"], str(ckpt.path)), ckpt.extra["hf_config"]
            what = "the graphllm config in the checkpoint"
        except GraphllmError as e:
            notes.append(f"the graphllm config in the checkpoint was not used ({e})")
    if ckpt.args is None:
        if stated is None:
            raise GraphllmError(f"--megatron {ckpt.path} holds no Megatron args (its 'args' entry); pass --hf-config with "
                                "the model's HF config.json")
        return stated, hf_config, notes
    derived, padded = config_from_args(ckpt.args, str(ckpt.path))
    if stated is None:
        notes.append(f"vocab_size is Megatron's padded_vocab_size {padded} (it may include padding rows); pass "
                     "--hf-config with the model's HF config.json to drop them")
        return derived, derived.to_hf(), notes
    check_target(stated, derived, padded, str(ckpt.path), what)
    if stated.vocab_size < padded:
        notes.append(f"dropped Megatron's vocabulary padding: {padded} embedding rows -> vocab_size "
                     f"{stated.vocab_size}")
    return stated, hf_config, notes


def _check_full(full: dict[str, torch.Tensor], cfg: ModelConfig, ckpt: MegatronCheckpoint) -> None:
    """Megatron names and shapes `cfg` expects (vocab rows: at least cfg.vocab_size) against what was read."""
    rows = full.get("embedding.word_embeddings.weight", torch.empty(cfg.vocab_size)).shape[0]
    with torch.device("meta"):
        want = to_megatron(_meta_model(cfg).state_dict(), cfg, max(rows, cfg.vocab_size))
    for name in sorted(set(want) | set(full), key=lambda n: (n not in want, n)):
        if name not in full:
            raise GraphllmError(f"{ckpt.path} lacks {name} (a {cfg.num_hidden_layers}-layer model"
                                f"{' with q/k/v biases' if cfg.attention_bias else ''}"
                                f"{'' if cfg.tie_word_embeddings else ', untied output layer'} is expected); a "
                                "truncated checkpoint, or args that do not describe it?")
        if name not in want:
            raise GraphllmError(f"{ckpt.path} has {name}, which the model its args describe does not have "
                                f"({cfg.num_hidden_layers} layers, {'tied' if cfg.tie_word_embeddings else 'untied'} "
                                "embeddings); the args do not describe these weights")
        if tuple(full[name].shape) != tuple(want[name].shape):
            raise GraphllmError(f"{ckpt.path}: {name} has shape {tuple(full[name].shape)} but the model its args "
                                f"describe needs {tuple(want[name].shape)}; the args do not describe these weights")


def _write_hf_files(dest: Path, target, hf_config: dict | None) -> list[str]:
    """Carry --hf-config's HF files (or the config.json dict) into the converted step's hf/; returns their names."""
    dest.mkdir()
    if target is not None and target[1] is not None:
        files = _present(target[1], (CONFIG_FILE, GENERATION_CONFIG, *TOKENIZER_FILES))
        for name in files:
            shutil.copy2(target[1] / name, dest / name)
        return files
    config = target[2] if target is not None and target[2] is not None else hf_config
    if config is None:
        dest.rmdir()
        return []
    (dest / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [CONFIG_FILE]


def graphllm_to_megatron(ckpt: str | os.PathLike[str], out: str | os.PathLike[str], *, tp: int = 1, pp: int = 1,
                         vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE, force: bool = False) -> ConvertResult:
    """Any graphllm checkpoint (a root: its newest step) -> Megatron-LM's legacy layout for tp x pp ranks."""
    path = _resolve_ckpt(Path(ckpt).expanduser().resolve())
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise GraphllmError(f"cannot read {path / MARKER}: {e}; the checkpoint is damaged: pick another one") from None
    cfg, aux = _config_and_files(path, marker)
    if vocab_multiple < 1:
        raise GraphllmError(f"--make-vocab-size-divisible-by must be >= 1, got {vocab_multiple}")
    padded = padded_vocab_size(cfg.vocab_size, vocab_multiple, tp)
    check_split(cfg, tp, pp, padded)
    dest = Path(out).expanduser().resolve()
    if dest == path or path in dest.parents:
        raise GraphllmError(f"--out {dest} is inside the checkpoint {path}; write the Megatron checkpoint elsewhere")
    if _nonempty_dir(dest, "--out") and not force:
        raise GraphllmError(f"--out {dest} exists and is not empty; choose a new directory, or pass --force to write "
                            f"this iteration and {TRACKER} into it (other files are kept)")
    sd = _read_weights(path, cfg)
    dtype = _elements_by_dtype(sd).most_common(1)[0][0]  # Megatron's params_dtype: most weights' dtype
    iteration = int(marker.get("step", 0))
    args = megatron_args(cfg, tp=tp, pp=pp, padded_vocab=padded, divisible_by=vocab_multiple, iteration=iteration,
                         dtype=dtype)
    hf_config = json.loads((aux / CONFIG_FILE).read_text()) if aux and (aux / CONFIG_FILE).is_file() else cfg.to_hf()
    full = to_megatron(sd, cfg, padded)
    notes = [] if cfg.vocab_size == padded else [f"vocabulary padded with zero rows: {cfg.vocab_size} -> {padded} "
                                                 f"(--make-vocab-size-divisible-by {vocab_multiple} x tp {tp})"]
    tmp = temp_dir_beside(dest)
    try:
        with writing_output(dest, _nbytes(full)):
            written = write_legacy(tmp, full, args, tp=tp, pp=pp, iteration=iteration,
                                   extra={"hf_config": hf_config, "version": __version__})
        umask_modes(tmp)
        notes += _install(tmp, dest, written.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ConvertResult(path=dest / written.name, tensors=len(full), parameters=sum(t.numel() for t in full.values()),
                         nbytes=_nbytes(full), dtypes=_dtype_names(full), files=[TRACKER], notes=notes)


def _elements_by_dtype(sd: dict[str, torch.Tensor]) -> Counter:
    counts: Counter = Counter()
    for t in sd.values():
        counts[t.dtype] += t.numel()
    return counts


def _read_weights(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every parameter of the checkpoint (names checked against `cfg`'s model), in its stored dtype."""
    stored = stored_parameters(path)
    if any("lora_" in k for k in stored):
        raise GraphllmError(f"--ckpt {path} holds LoRA adapters; merge them first (graphllm convert merge-lora, then "
                            "hf-to-graphllm) and convert the merged checkpoint")
    if "score.weight" in stored and "lm_head.weight" not in stored:
        raise GraphllmError(f"--ckpt {path} is a reward model (a score head); Megatron's GPT has no such head")
    names = check_state_dict(_meta_model(cfg), stored, str(path))
    sd = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in names.items()}
    load_checkpoint(path, named_params=sd, want_optim=False, st=None, expect_fingerprint=None)
    return sd


def _install(tmp: Path, dest: Path, name: str) -> list[str]:
    """Move the written iteration and tracker into `dest`: one rename for a new or empty `dest`; otherwise
    (--force) the iteration directory (replacing one of the same name), then the tracker, other files kept."""
    if not dest.exists() or not any(dest.iterdir()):
        _rename_new(tmp, dest)
        return []
    old = dest / name
    if old.exists():
        os.rename(old, tmp / ".replaced")  # removed with tmp
    os.rename(tmp / name, old)
    os.replace(tmp / TRACKER, dest / TRACKER)
    others = sorted(p.name for p in dest.iterdir() if p.name.startswith("iter_") and p.name != name)
    return [f"{dest} also holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}; {TRACKER} now names "
            f"{name}"] if others else []
