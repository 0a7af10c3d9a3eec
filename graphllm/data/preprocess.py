"""`graphllm preprocess pretrain`: jsonl / text / parquet files -> a Megatron indexed dataset (`.bin` + `.idx`).

Each document becomes one sequence: its token ids, then the tokenizer's EOS when `append_eod`.
Inputs are `.jsonl`/`.json` files (one JSON object per line, or a JSON array; the text under
`json_key`; blank lines are ignored), `.txt` files (each blank-line separated paragraph is a
document) or `.parquet` files (the `json_key` column; needs pyarrow).

Reading, the worker pool and malformed-record accounting are shared with the chat kinds
(`graphllm.data.records`): records are decoded and parsed in the workers through an ordered imap,
so the output is byte-identical whatever the worker count; a malformed record (bad UTF-8, invalid
JSON, not an object, missing key, non-string or empty text) is skipped and reported with
file:line, or with `strict` stops the run. Outputs are atomic (`graphllm.data.writers.Outputs`):
`<out>.bin/.idx` appear only once complete, then `<out>_meta.json`; a failed run leaves any earlier
files at the prefix untouched. The chat kinds live in `graphllm.data.sft`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphllm.data.encoders import load_encoder, resolve_spec, tokenizer_meta
from graphllm.data.indexed import best_dtype
from graphllm.data.records import SkipLog, check_inputs, map_records, record_text
from graphllm.data.sft import ChatDataConfig, preprocess_chat
from graphllm.data.writers import Outputs, Summary
from graphllm.errors import GraphllmError

__all__ = ["ChatDataConfig", "PretrainConfig", "Summary", "preprocess_chat", "preprocess_pretrain"]


@dataclass(kw_only=True, slots=True)
class PretrainConfig:
    inputs: list[Path]
    """`.jsonl`/`.json` files (one object per line, or a JSON array), `.txt` files (blank-line separated
    paragraphs) or `.parquet` files."""
    tokenizer: str
    """A sentencepiece `.model` file, a local Hugging Face tokenizer directory, or `builtin`."""
    out: Path
    """Output prefix: writes `<out>.bin`, `<out>.idx` and `<out>_meta.json`; its directory must exist."""
    json_key: str = "text"
    """The field of each JSON object that holds the document text."""
    workers: int = 1
    """Tokenizer processes; the output does not depend on it."""
    append_eod: bool = True
    """Append the tokenizer's EOS id to every document."""
    strict: bool = False
    """Stop at the first malformed record instead of skipping it."""


class _PretrainJob:
    """Per-record work in the workers: text -> ids (+ EOD)."""

    def __init__(self, spec: str, key: str, eod: int | None) -> None:
        self.spec, self.key, self.eod = spec, key, eod
        self.encoder = None

    def __getstate__(self) -> dict:  # workers load their own tokenizer
        return {**self.__dict__, "encoder": None}

    def setup(self) -> None:
        if self.encoder is None:
            self.encoder = load_encoder(self.spec)

    def run(self, kind: str, payload: Any) -> np.ndarray:
        ids = self.encoder.encode(record_text(kind, payload, self.key))
        if self.eod is not None:
            ids.append(self.eod)
        return np.asarray(ids, dtype=np.int32)  # one buffer to pickle back, not a list of ints


def preprocess_pretrain(cfg: PretrainConfig, progress: Callable[[int], None] | None = None) -> Summary:
    """Tokenize `cfg.inputs` into `<cfg.out>.bin/.idx` (+ `_meta.json`); `progress(n)` is called as n
    more records finish."""
    if cfg.workers < 1:
        raise GraphllmError(f"--workers must be at least 1, got {cfg.workers}")
    inputs = [Path(p) for p in cfg.inputs]
    check_inputs(inputs, allow_text=True)
    job = _PretrainJob(resolve_spec(cfg.tokenizer), cfg.json_key, None)
    job.setup()  # fail here, in the parent, with a clear message
    if cfg.append_eod:
        if job.encoder.eos_id is None:
            raise GraphllmError(f"--tokenizer {cfg.tokenizer} has no EOS token to append; pass --no-eod")
        job.eod = job.encoder.eos_id

    summary = Summary()
    log = SkipLog(strict=cfg.strict)
    with Outputs(cfg.out, {"tokens": (cfg.out, best_dtype(job.encoder.vocab_size))}) as out:
        writer = out["tokens"]
        for ids in map_records(job, inputs, workers=cfg.workers, log=log, progress=progress, read=out.read):
            writer.add_document(ids)
            summary.documents += 1
            summary.tokens += len(ids)
        summary.samples, summary.trained_tokens = summary.documents, summary.tokens
        summary.skipped, summary.bad_lines = dict(log.skipped), log.bad_lines
        if not summary.documents:
            first = f"; first: {':'.join(map(str, log.bad_lines[0]))}" if log.bad_lines else ""
            raise GraphllmError(f"no documents written from {', '.join(map(str, inputs))}: every record was "
                                f"malformed ({summary.num_skipped}){first}; fix the records or --json-key")
        out.finalize(summary, {"kind": "pretrain", **tokenizer_meta(job.encoder, cfg.tokenizer), "packed": False,
                               "seq_len": None, "append_eod": cfg.append_eod, "json_key": cfg.json_key})
    return summary
