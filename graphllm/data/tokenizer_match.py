"""Which tokenizer a model reads, and whether a dataset was tokenized with it.

`model_tokenizer(source)` is what `graphllm compile` records in plan.json ("model" -> "tokenizer"): for an
HF checkpoint directory, the tokenizer saved in it (None when the directory holds none); for a preset,
graphllm's built-in tokenizer (presets train on the built-in corpus encoded with it). Each is a
`tokenizer_record`: spec, fingerprint (graphllm.data.encoders), vocab size.

`check_data_tokenizer` compares a dataset's `PREFIX_meta.json` (which `graphllm preprocess` writes with
the same record) with the model's before anything is compiled: another fingerprint is refused with one
line naming both tokenizers and the fix; data or a model without a fingerprint is accepted with a
warning that the match cannot be checked.
"""

from __future__ import annotations

import logging
from pathlib import Path

from graphllm.data.encoders import BUILTIN, HuggingFaceEncoder, load_encoder, resolve_spec, tokenizer_record
from graphllm.errors import GraphllmError

__all__ = ["TOKENIZER_FILES", "check_data_tokenizer", "describe", "model_tokenizer"]

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Any of these in an HF model directory means it carries its tokenizer (save_pretrained writes them)."""


def model_tokenizer(source: str) -> dict | None:
    """The tokenizer record of the model `source` (a preset name or an HF checkpoint directory); None
    for a directory without tokenizer files (or whose files do not load: then with a warning)."""
    from graphllm.models import PRESETS

    if source in PRESETS:
        return tokenizer_record(load_encoder(resolve_spec(BUILTIN), BUILTIN))
    path = Path(source)
    if not (path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES)):
        return None
    try:
        return tokenizer_record(HuggingFaceEncoder(path))
    except GraphllmError as e:
        log.warning("%s: its tokenizer files do not load, so no tokenizer is recorded for the model (%s)", path, e)
        return None


def describe(record: dict) -> str:
    return f"{record['spec']} (fingerprint {record['fingerprint']})"


def check_data_tokenizer(prefix: str, meta: dict, model_tok: dict | None, model: str) -> str | None:
    """Refuse `--data prefix` (its meta file read as `meta`) when it was tokenized with another tokenizer
    than the model `model` reads (`model_tok`); returns the warning to show when either side has no
    fingerprint (the match cannot be checked), else None."""
    fingerprint = meta.get("tokenizer_fingerprint")
    if fingerprint is None:
        return (f"--data {prefix} has no tokenizer fingerprint in {prefix}_meta.json (preprocessed by an older "
                f"graphllm, or by another tool): cannot check that its ids are those of {model}'s tokenizer; rerun "
                "graphllm preprocess to have it checked")
    if model_tok is None:
        return (f"{model} has no tokenizer files: cannot check that --data {prefix} (tokenized with "
                f"{meta.get('tokenizer')}) matches it; save the model's tokenizer into it (tokenizer.save_pretrained)")
    if fingerprint != model_tok["fingerprint"]:
        data_tok = {"spec": meta.get("tokenizer"), "fingerprint": fingerprint}
        raise GraphllmError(f"--data {prefix} was tokenized with {describe(data_tok)} but {model} reads the ids of "
                            f"{describe(model_tok)}; preprocess the data again with --tokenizer {model_tok['spec']}")
    return None
