"""`graphllm preprocess alpaca|sharegpt|pairwise|prm`: conversations -> token ids + loss labels.

Outputs under `--out PREFIX` (Megatron indexed datasets; labels int32, IGNORE_INDEX = -100 where
no loss is taken, equal to the token id where it is; not shifted, the trainer shifts):
- alpaca / sharegpt ("sft") and prm: `PREFIX_input_ids_document` and `PREFIX_labels_document`,
  one document per sample, or with `pack` several samples per document, one sequence each
  (next-fit in input order, see `writers.SampleSink`);
- pairwise: `PREFIX_{chosen,rejected}_{input_ids,labels}_document`, sample i of chosen and of
  rejected from the same record (a record is dropped from both or kept in both); never packed;
- `PREFIX_meta.json` last (see `writers.Outputs`).
A sample longer than `seq_len` is skipped or truncated (`overlong`), counted in the summary; a
truncated sample that keeps no trained token is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from graphllm.data.conversations import (
    alpaca_messages,
    pairwise_messages,
    sharegpt_messages,
)
from graphllm.data.encoders import Encoder, load_encoder, resolve_spec, tokenizer_meta
from graphllm.data.indexed import best_dtype
from graphllm.data.prm import PrmTokens, encode_prm
from graphllm.data.records import SkipLog, check_inputs, map_records, record_object
from graphllm.data.templates import IGNORE_INDEX, Template, make_template
from graphllm.data.writers import (
    LABEL_DTYPE,
    Outputs,
    SampleSink,
    Summary,
    fit_sample,
    sample_arrays,
)
from graphllm.errors import GraphllmError

__all__ = ["ChatDataConfig", "preprocess_chat"]

Kind = Literal["alpaca", "sharegpt", "pairwise", "prm"]
META_KIND = {"alpaca": "sft", "sharegpt": "sft", "pairwise": "pairwise", "prm": "prm"}


@dataclass(kw_only=True, slots=True)
class ChatDataConfig:
    kind: Kind
    """Record schema: alpaca, sharegpt (multi-turn), pairwise (chosen/rejected) or prm (step labels)."""
    inputs: list[Path]
    """`.jsonl`, `.json` (an array, or one object per line) or `.parquet` files."""
    tokenizer: str
    """A sentencepiece `.model` file, a local Hugging Face tokenizer directory, or `builtin`."""
    out: Path
    """Output prefix; its directory must exist."""
    workers: int = 1
    """Tokenizer processes; the output does not depend on it."""
    strict: bool = False
    """Stop at the first malformed record (exit 2, nothing written) instead of skipping it."""
    template: Literal["auto", "chat", "alpaca"] = "auto"
    """auto: the tokenizer's chat template (alpaca records fall back to the Alpaca template); chat:
    require it; alpaca: the built-in Alpaca template."""
    pack: bool = False
    """Pack several samples into each document of at most `seq_len` tokens."""
    seq_len: int | None = None
    """Longest sample (and packed document) in tokens; None: no limit (not allowed with `pack`)."""
    overlong: Literal["skip", "truncate"] = "skip"
    """What happens to a sample longer than `seq_len`."""
    step_tag: str = " ки"
    """prm: the marker after each step; its first token carries the step's label."""
    step_sep: str = "\n"
    """prm (structured records): text between a step's tag and the next step, masked."""
    good_token: str = "+"
    """prm: the label token of a correct step (must be one token)."""
    bad_token: str = "-"
    """prm: the label token of a wrong step (must be one token)."""

    def check(self) -> None:
        if self.kind not in META_KIND:
            raise GraphllmError(f"unknown preprocess kind {self.kind!r}; use one of {', '.join(META_KIND)}")
        if self.workers < 1:
            raise GraphllmError(f"--workers must be at least 1, got {self.workers}")
        if self.seq_len is not None and self.seq_len < 1:
            raise GraphllmError(f"--seq-len must be positive, got {self.seq_len}")
        if self.pack and self.seq_len is None:
            raise GraphllmError("--pack needs --seq-len N (the packed document length)")
        if self.pack and self.kind == "pairwise":
            raise GraphllmError("--pack is not supported for pairwise data (chosen and rejected must stay aligned); drop it")
        if self.overlong not in ("skip", "truncate"):
            raise GraphllmError(f"--overlong {self.overlong!r}: use skip or truncate")


class _ChatJob:
    """Per-record work, run in the worker processes; holds only strings until `setup()`."""

    def __init__(self, cfg: ChatDataConfig, spec: str) -> None:
        self.kind, self.spec, self.name, self.choice = cfg.kind, spec, cfg.tokenizer, cfg.template
        self.prm_options = {"step_tag": cfg.step_tag, "step_sep": cfg.step_sep, "good": cfg.good_token,
                            "bad": cfg.bad_token}
        self.encoder: Encoder | None = None
        self.template: Template | None = None
        self.prm: PrmTokens | None = None

    def __getstate__(self) -> dict:  # workers load their own tokenizer
        return {**self.__dict__, "encoder": None, "template": None, "prm": None}

    def setup(self) -> None:
        if self.encoder is not None:
            return
        self.encoder = load_encoder(self.spec, self.name)
        self.template = make_template(self.encoder, self.choice, fallback=self.kind == "alpaca")
        if self.kind == "prm":
            self.prm = PrmTokens.build(self.encoder, **self.prm_options)

    def run(self, kind: str, payload: Any):
        out = self._encode(record_object(kind, payload))
        return tuple(sample_arrays(*o) for o in out) if self.kind == "pairwise" else sample_arrays(*out)

    def _encode(self, obj: dict):
        tpl = self.template
        if self.kind == "alpaca":
            messages = alpaca_messages(obj, tpl.input_join)
            return tpl.encode(messages, [True] * len(messages))
        if self.kind == "sharegpt":
            messages = sharegpt_messages(obj)
            return tpl.encode(messages, [True] * len(messages))
        if self.kind == "pairwise":
            chosen, rejected, n_prompt = pairwise_messages(obj)
            # only the response is trained, never assistant turns inside a multi-turn prompt
            return tuple(tpl.encode(c, [i >= n_prompt for i in range(len(c))]) for c in (chosen, rejected))
        return encode_prm(obj, self.encoder, tpl, self.prm, self.prm_options["step_tag"])


def preprocess_chat(cfg: ChatDataConfig, progress: Callable[[int], None] | None = None) -> Summary:
    """Tokenize `cfg.inputs` into the datasets described in the module docstring; returns the summary."""
    cfg.check()
    inputs = [Path(p) for p in cfg.inputs]
    check_inputs(inputs, allow_text=False)
    job = _ChatJob(cfg, resolve_spec(cfg.tokenizer))
    job.setup()  # fail here, in the parent, with a clear message (no chat template, bad tokenizer...)
    ids_dtype = best_dtype(job.encoder.vocab_size)
    sides = ("chosen_", "rejected_") if cfg.kind == "pairwise" else ("",)
    datasets = {f"{side}{what}": (Path(f"{cfg.out}_{side}{what}_document"),
                                  ids_dtype if what == "input_ids" else LABEL_DTYPE)
                for side in sides for what in ("input_ids", "labels")}
    summary = Summary(overlong_policy=cfg.overlong if cfg.seq_len is not None else None)
    parts = {side: Summary() for side in sides}
    log = SkipLog(strict=cfg.strict)
    with Outputs(cfg.out, datasets) as out:
        sinks = [SampleSink(out[f"{side}input_ids"], out[f"{side}labels"], parts[side],
                            pack_len=cfg.seq_len if cfg.pack else None, ignore_index=IGNORE_INDEX) for side in sides]
        for result in map_records(job, inputs, workers=cfg.workers, log=log, progress=progress, read=out.read):
            samples = result if cfg.kind == "pairwise" else (result,)
            fitted = [fit_sample(ids, labels, cfg.seq_len, cfg.overlong, IGNORE_INDEX) for ids, labels in samples]
            if any(f is None for f in fitted):
                summary.overlong += 1
                continue
            summary.overlong += any(len(f[0]) < len(s[0]) for f, s in zip(fitted, samples, strict=True))
            for sink, (ids, labels) in zip(sinks, fitted, strict=True):
                sink.add(ids, labels)
        for sink in sinks:
            sink.flush()
        first = parts[sides[0]]
        summary.documents, summary.samples = first.documents, first.samples
        summary.tokens = sum(p.tokens for p in parts.values())
        summary.trained_tokens = sum(p.trained_tokens for p in parts.values())
        summary.skipped, summary.bad_lines = dict(log.skipped), log.bad_lines
        if not summary.samples:
            raise GraphllmError(f"no samples written from {', '.join(map(str, inputs))}: {_why_empty(summary)}")
        meta = {"kind": META_KIND[cfg.kind], "format": cfg.kind, **tokenizer_meta(job.encoder, cfg.tokenizer),
                "packed": cfg.pack, "seq_len": cfg.seq_len, "template": job.template.name,
                "label_ignore_index": IGNORE_INDEX, "labels_shifted": False,
                "input_ids_dtype": np.dtype(ids_dtype).name, "overlong": summary.overlong_policy,
                "overlong_samples": summary.overlong, "pack_algorithm": "next-fit" if cfg.pack else None,
                # PREFIX_<value> per dataset; relative, so a renamed prefix keeps a valid meta file
                "datasets": {name: f"{name}_document" for name in datasets}}
        if job.prm is not None:
            meta["prm"] = {"step_tag": cfg.step_tag, "step_tag_ids": job.prm.tag, "step_sep": cfg.step_sep,
                           "good_token": cfg.good_token, "good_id": job.prm.good,
                           "bad_token": cfg.bad_token, "bad_id": job.prm.bad}
        out.finalize(summary, meta)
    return summary


def _why_empty(summary: Summary) -> str:
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(summary.skipped.items()))
    parts = [f"skipped {reasons}"] if reasons else []
    if summary.overlong:
        parts.append(f"{summary.overlong} longer than --seq-len")
    if summary.bad_lines:
        path, no, detail = summary.bad_lines[0]
        parts.append(f"first: {path}:{no}: {detail}")
    return "; ".join(parts) + "; fix the records or the options"
