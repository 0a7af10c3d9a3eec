"""Convert between Hugging Face model directories and graphllm training checkpoints.

`hf_to_graphllm(HF_DIR, ROOT)` writes `ROOT/step_0/`: a graphllm checkpoint (graphllm.parallel.checkpoint,
one copy of each full tensor, keys "model/<fqn>") whose marker says {"kind": "weights"}, plus the HF
directory's config.json, generation_config.json and tokenizer files under `step_0/hf/`. Checkpoints are
layout-independent, so `--tp/--pp` only validate that the model can be split that way (the layout's own
checks) and are recorded in the marker. `graphllm run ARTIFACT --load ROOT` loads its weights, starts at
step 0 with a fresh optimizer, and `--save ROOT` then puts `step_<N>/` beside it.

`graphllm_to_hf(CKPT, OUT)` reads the parameters of any graphllm checkpoint (a converted one or one of
`graphllm run --save`; a root means its newest complete step) and writes what transformers'
`from_pretrained` reads: config.json, model.safetensors (or shards + index above `max_shard_size`),
generation_config.json and the tokenizer files it carries. A reward-model checkpoint (`--task rm`: a
`score.weight` and no LM head) becomes a `*ForSequenceClassification` directory with `num_labels` 1 and a
`pad_token_id` (transformers reads the reward at each row's last token that is not padding; see
graphllm.tasks.reward_model.sequence_classification_config). Tensors keep their stored dtype unless asked,
so HF -> graphllm -> HF is bit-identical. A tied LM head is stored once, as transformers does.

Nothing half-written is ever left under the output name: everything goes into a temp directory beside
it, renamed into place at the end. An existing non-empty output is refused unless `force`. What is
written gets the modes a plain `open`/`mkdir` would give under the user's umask (not mkstemp's/mkdtemp's
0600/0700, nor safetensors' 0600, nor the mode of a copied source file), so a serving process under
another uid can read an exported directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graphllm.version import __version__
from graphllm.disk_space import writing_output
from graphllm.errors import GraphllmError
from graphllm.models import (
    LlamaForCausalLM,
    ModelConfig,
    load_config,
    read_hf_state_dict,
)
from graphllm.models.hub import resolve_model
from graphllm.output_dir import temp_dir_beside, umask_modes
from graphllm.models.mtp_weights import mtp_modules_in_files
from graphllm.models.weights import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    check_state_dict,
    parse_size,
    write_safetensors,
)
from graphllm.parallel.checkpoint import (
    MARKER,
    latest_checkpoint,
    load_checkpoint,
    stored_parameters,
    save_checkpoint,
)
from graphllm.planning.layout import Layout
from graphllm.resume import WEIGHTS_ONLY, weights_fingerprint
from graphllm.tasks.reward_model import REWARD_HEAD, sequence_classification_config

HF_SUBDIR = "hf"
"""Where a converted checkpoint keeps the HF directory's non-weight files."""
CONVERTED_STEP = "step_0"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass(kw_only=True, slots=True)
class ConvertResult:
    """What a conversion wrote."""

    path: Path
    """The checkpoint directory (ROOT/step_0) or the HF directory."""
    tensors: int
    parameters: int
    """Elements of all tensors written (a tied head counted once)."""
    nbytes: int
    dtypes: list[str]
    files: list[str]
    """Non-weight files carried across (config, generation config, tokenizer)."""
    notes: list[str] = field(default_factory=list)
    """Things the user should know (no tokenizer found, newer steps beside the converted one)."""


def hf_to_graphllm(hf_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, tp: int = 1, pp: int = 1,
                   dtype: str | None = None, force: bool = False, mtp_layers: int = 0) -> ConvertResult:
    """HF directory -> `out/step_0` (weights-only graphllm checkpoint + the HF files in `hf/`).

    `mtp_layers`: keep that many of the directory's multi-token prediction modules (DeepSeek-V3's layers past
    num_hidden_layers, models/mtp_weights.py); without it they are dropped, as transformers drops them."""
    _check_dtype(dtype)
    if mtp_layers < 0:
        raise GraphllmError(f"--mtp-layers {mtp_layers}: must be 0 or more (the MTP modules to keep)")
    hf = Path(resolve_model(os.fspath(hf_dir))).expanduser().resolve()  # a Hub id: its cached snapshot
    if not hf.is_dir():
        raise GraphllmError(f"--hf {hf}: no such directory; point it at a Hugging Face model directory")
    if not (hf / CONFIG_FILE).is_file():
        raise GraphllmError(f"--hf {hf} has no {CONFIG_FILE}; point it at a complete Hugging Face model directory "
                            "(config.json + *.safetensors)")
    cfg = dataclasses.replace(load_config(hf), mtp_layers=mtp_layers)
    layout = Layout(tp=tp, pp=pp, micro_batches=pp)  # micro_batches only has to let the pipeline fill
    layout.check_model(cfg, batch_size=1, seq_len=1)  # batch and sequence shape no weight
    root = Path(out).expanduser().resolve()
    notes = _check_ckpt_out(root, force)
    files = read_hf_state_dict(hf)
    if mtp_layers > (held := mtp_modules_in_files(files, cfg)):
        raise GraphllmError(f"--hf {hf} holds {held} multi-token prediction module(s) (model.layers.<"
                            f"{cfg.num_hidden_layers}+k>.eh_proj.weight); convert with --mtp-layers {held} or fewer")
    sd = _cast(check_state_dict(_meta_model(cfg), files, str(hf)), dtype)
    meta = {"kind": WEIGHTS_ONLY, "fingerprint": weights_fingerprint(cfg), "model": str(hf), "config": cfg.to_dict(),
            "layout": layout.describe(), "dtypes": _dtype_names(sd), "graphllm": __version__}
    carried = _present(hf, (CONFIG_FILE, GENERATION_CONFIG, *TOKENIZER_FILES))
    if not any(f in TOKENIZER_FILES for f in carried):
        notes.append(f"{hf} has no tokenizer files; graphllm-to-hf will need --tokenizer DIR to export one")
    tmp = temp_dir_beside(root)
    try:
        with writing_output(root, _nbytes(sd)):  # a full disk: one line, the partial output removed below
            step = save_checkpoint(tmp / CONVERTED_STEP, step=0, named_params=sd, optim_state=None, extra={},
                                   meta=meta, st=None)
            (step / HF_SUBDIR).mkdir()
            for name in carried:
                shutil.copy2(hf / name, step / HF_SUBDIR / name)
        umask_modes(step / HF_SUBDIR)
        _place_step(tmp, step, root, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ConvertResult(path=root / CONVERTED_STEP, tensors=len(sd), parameters=sum(t.numel() for t in sd.values()),
                         nbytes=_nbytes(sd), dtypes=_dtype_names(sd), files=carried, notes=notes)


def _place_step(tmp: Path, step: Path, root: Path, force: bool) -> None:
    """The written `tmp/step_0` into `root`: beside a root's other steps (its step_0 replaced only as --force asked;
    _check_ckpt_out allowed only a graphllm checkpoint), or `tmp` renamed onto a new root. rename(2) refuses a
    non-empty target, so a conversion that filled `root` meanwhile is never overwritten without --force."""
    if not root.exists():
        return _rename_new(tmp, root)
    if force and (root / CONVERTED_STEP).exists():
        os.rename(root / CONVERTED_STEP, tmp / ".replaced")
    _rename_new(step, root / CONVERTED_STEP)


def _rename_new(tmp: Path, dest: Path) -> None:
    """rename(2) `tmp` onto a new or empty `dest`; one line if something else filled `dest` meanwhile."""
    try:
        os.rename(tmp, dest)
    except OSError as e:
        raise GraphllmError(f"--out {dest} was filled by something else during the conversion ({e.strerror}); "
                            "nothing was written: choose another --out (or --force to replace it)") from None


def graphllm_to_hf(ckpt: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: str | None = None,
                   max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, tokenizer: str | os.PathLike[str] | None = None,
                   force: bool = False) -> ConvertResult:
    """Any graphllm checkpoint (or the newest under a root) -> an HF directory transformers loads."""
    _check_dtype(dtype)
    path = _resolve_ckpt(Path(ckpt).expanduser().resolve())
    max_bytes = parse_size(max_shard_size)
    tok_dir = _tokenizer_dir(tokenizer)
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise GraphllmError(f"cannot read {path / MARKER}: {e}; the checkpoint is damaged: pick another one") from None
    cfg, aux = _config_and_files(path, marker)
    dest = Path(out).expanduser().resolve()
    if dest == path or path in dest.parents:
        raise GraphllmError(f"--out {dest} is inside the checkpoint {path}; write the HF directory elsewhere")
    _check_hf_out(dest, force)

    stored = stored_parameters(path)
    reward = REWARD_HEAD in stored and "lm_head.weight" not in stored  # a --task rm checkpoint
    sd = _cast(check_state_dict(_meta_model(cfg, reward=reward), stored, str(path)), dtype)  # meta: names, shapes

    def materialize(names: list[str]) -> dict[str, torch.Tensor]:
        """One shard's tensors read from the checkpoint (DCP reads only their bytes), cast as asked."""
        part = {k: torch.empty(stored[k].shape, dtype=stored[k].dtype) for k in names}
        load_checkpoint(path, named_params=part, want_optim=False, st=None, expect_fingerprint=None)
        return _cast(part, dtype)

    notes: list[str] = []
    hf_config = json.loads((aux / CONFIG_FILE).read_text()) if aux and (aux / CONFIG_FILE).is_file() else cfg.to_hf()
    if reward:
        notes += sequence_classification_config(hf_config, cfg.model_type)
    names = _dtype_names(sd)
    hf_config["dtype"] = max(names, key=lambda n: sum(t.numel() for t in sd.values() if _name(t.dtype) == n))
    if "torch_dtype" in hf_config:  # transformers < 5 spelling, kept in step
        hf_config["torch_dtype"] = hf_config["dtype"]
    tok_src = tok_dir or aux
    tok_files = _present(tok_src, TOKENIZER_FILES) if tok_src else []
    if not tok_files:
        notes.append("no tokenizer files in the checkpoint; pass --tokenizer DIR to include them")
    tmp = temp_dir_beside(dest)
    try:
        with writing_output(dest, _nbytes(sd)):  # a full disk: one line, the partial output removed below
            # cfg: HF's fused projections (Phi-3, GLM-4) are written fused (models/weights.py fuse_for_hf)
            write_safetensors(sd, tmp, max_shard_bytes=max_bytes, materialize=materialize, cfg=cfg)
            for name in tok_files:
                shutil.copy2(tok_src / name, tmp / name)
        if aux and (aux / GENERATION_CONFIG).is_file():
            shutil.copy2(aux / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
        else:  # what transformers derives from a model config
            gen = {"_from_model_config": True, **{k: hf_config[k] for k in ("bos_token_id", "eos_token_id",
                                                                            "pad_token_id") if k in hf_config}}
            (tmp / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        umask_modes(tmp)
        _install_hf(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ConvertResult(path=dest, tensors=len(sd), parameters=sum(t.numel() for t in sd.values()),
                         nbytes=_nbytes(sd), dtypes=names, files=[CONFIG_FILE, GENERATION_CONFIG, *tok_files],
                         notes=notes)


def _meta_model(cfg: ModelConfig, *, reward: bool = False) -> torch.nn.Module:
    """The model's names and shapes, without allocating its weights; `reward`: the reward model's (the
    decoder and `score` [1, hidden], transformers' *ForSequenceClassification, graphllm.tasks.reward_model)."""
    with torch.device("meta"):
        lm = LlamaForCausalLM(cfg)
        if not reward:
            return lm
        head = torch.nn.Module()
        head.model, head.score = lm.model, torch.nn.Linear(cfg.hidden_size, 1, bias=False)
        return head


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_names(sd: dict[str, torch.Tensor]) -> list[str]:
    return sorted({_name(t.dtype) for t in sd.values()})


def _nbytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise GraphllmError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def _cast(sd: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    """`sd` unchanged (dtype None: keep each tensor's stored dtype), or every tensor cast to `dtype`."""
    if dtype is None:
        return sd
    return {k: v.to(DTYPES[dtype]) for k, v in sd.items()}


def _present(src: Path, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if (src / n).is_file()]


def _nonempty_dir(path: Path, flag: str) -> bool:
    if path.exists() and not path.is_dir():
        raise GraphllmError(f"{flag} {path} is a file; give a directory path")
    return path.is_dir() and any(path.iterdir())


def _check_ckpt_out(root: Path, force: bool) -> list[str]:
    """Refuse what hf_to_graphllm must not touch; returns notes about what stays beside the new step."""
    if not _nonempty_dir(root, "--out"):
        return []
    if not force:
        raise GraphllmError(f"--out {root} exists and is not empty; choose a new directory, or pass --force to "
                            f"replace {root / CONVERTED_STEP} there")
    old = root / CONVERTED_STEP
    if old.exists() and not (old / MARKER).is_file():
        raise GraphllmError(f"--out {root}: {old} exists but is not a graphllm checkpoint, so --force will not "
                            "replace it; move it away or choose another --out")
    newest = latest_checkpoint(root)
    if newest is not None and newest.name != CONVERTED_STEP:
        return [(f"{root} also holds {newest.name}: `--load {root}` picks the newest step, not the converted one; "
                 f"pass --load {old}")]
    return []


def _check_hf_out(dest: Path, force: bool) -> None:
    if _nonempty_dir(dest, "--out") and not force:
        raise GraphllmError(f"--out {dest} exists and is not empty; choose a new directory, or pass --force to "
                            "overwrite its model files (other files are kept)")


def _stale_weights(dest: Path) -> list[Path]:
    """Weight files of an earlier export, which would shadow or mix with the new ones."""
    return [p for p in dest.iterdir() if p.name in (SINGLE_FILE, INDEX_FILE)
            or (p.name.startswith("model-") and p.name.endswith(".safetensors"))]


def _install_hf(tmp: Path, dest: Path) -> None:
    """Move the finished files into `dest`. A new or empty `dest` is one rename; otherwise (--force) as
    save_pretrained does: old config.json first (so a crash leaves no directory that looks loadable),
    then the old weight files, then the new files, config.json last. Other files in `dest` stay."""
    if not dest.exists() or not any(dest.iterdir()):
        os.rename(tmp, dest)  # rename(2) may replace an empty directory
        return
    (dest / CONFIG_FILE).unlink(missing_ok=True)
    for stale in _stale_weights(dest):
        stale.unlink()
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_FILE):
        os.replace(f, dest / f.name)


def _resolve_ckpt(path: Path) -> Path:
    """A checkpoint directory, or the newest complete step_<N> under a root (as `run --load` picks)."""
    if (path / MARKER).is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        why = "no such directory" if not path.exists() else f"no {MARKER} and no complete step_<N>/ inside"
        raise GraphllmError(f"--ckpt {path} is not a graphllm checkpoint ({why}); point it at a step directory "
                            "written by `graphllm run --save` or `graphllm convert hf-to-graphllm`, or at their root")
    return found


def _tokenizer_dir(tokenizer: str | os.PathLike[str] | None) -> Path | None:
    if tokenizer is None:
        return None
    tok = Path(tokenizer).expanduser().resolve()
    if not (tok.is_dir() and _present(tok, TOKENIZER_FILES)):
        raise GraphllmError(f"--tokenizer {tok} is not a directory with tokenizer files ({', '.join(TOKENIZER_FILES[:5])}, "
                            "...); point it at an HF model or tokenizer directory")
    return tok


def _config_and_files(path: Path, marker: dict) -> tuple[ModelConfig, Path | None]:
    """The checkpoint's ModelConfig and the directory holding its HF files (config.json, tokenizer), if any.

    The config comes from the marker ("config", written by graphllm since conversion existed), else from
    the converted checkpoint's hf/config.json, else from the model the run was compiled from (a preset or
    an HF directory that still exists); each must match the marker's fingerprint."""
    fingerprint = marker.get("fingerprint")
    candidates: list[tuple[str, object]] = []
    if isinstance(marker.get("config"), dict):
        candidates.append(("the checkpoint's config", marker["config"]))
    if (path / HF_SUBDIR / CONFIG_FILE).is_file():
        candidates.append((str(path / HF_SUBDIR), path / HF_SUBDIR))
    if isinstance(marker.get("model"), str):
        candidates.append((marker["model"], marker["model"]))
    cfg, tried = None, []
    for what, source in candidates:
        try:
            found = ModelConfig(**source) if isinstance(source, dict) else load_config(source)
        except (GraphllmError, TypeError) as e:
            tried.append(f"{what}: {e}")
            continue
        seen = {dataclasses.replace(found, attn_implementation=a).fingerprint() for a in ("sdpa", "eager")}
        if fingerprint in seen | {weights_fingerprint(found)}:  # a weights-only one's ignores MTP modules
            cfg = found
            break
        tried.append(f"{what}: another configuration")
    if cfg is None:
        raise GraphllmError(f"checkpoint {path}: cannot find the model configuration it was saved with (fingerprint "
                            f"{fingerprint}; tried {'; '.join(tried) or 'nothing'}); convert a checkpoint written by "
                            "this graphllm")
    return cfg, _hf_files_dir(path, marker, cfg)


def _hf_files_dir(path: Path, marker: dict, cfg: ModelConfig) -> Path | None:
    """Where the checkpoint's HF files are: its own hf/ (a converted checkpoint); else, for a training
    checkpoint, the HF directory its run was compiled from, or the hf/ of a converted step_0 beside it
    (`run --load ROOT --save ROOT`) — each only if its config.json describes these weights."""
    if (path / HF_SUBDIR).is_dir():
        return path / HF_SUBDIR
    want = weights_fingerprint(cfg)
    candidates = [path.parent / CONVERTED_STEP / HF_SUBDIR]
    if marker.get("model"):
        candidates.insert(0, Path(str(marker["model"])).expanduser())
    for d in candidates:
        try:
            if (d / CONFIG_FILE).is_file() and load_config(d).fingerprint() == want:
                return d
        except GraphllmError:
            continue
    return None
