"""Small indexed datasets for the data tests, written with IndexedWriter to the preprocessing spec:
pretrain `PREFIX.bin/.idx` (EOD at each document's end); SFT `PREFIX_input_ids_document` +
`PREFIX_labels_document` (labels aligned with inputs, -100 where masked) and `PREFIX_meta.json`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from graphllm.data import IndexedWriter

EOD = 2


def write_pretrain(prefix: Path, *, docs: int, lo: int, hi: int, seed: int = 0, max_len: int = 40) -> list[np.ndarray]:
    """`docs` documents of random ids in [lo, hi), each ending in EOD; returns them."""
    rng = np.random.default_rng(seed)
    out = []
    with IndexedWriter(prefix, np.uint16) as w:
        for _ in range(docs):
            doc = np.concatenate([rng.integers(lo, hi, int(rng.integers(3, max_len))), [EOD]]).astype(np.int64)
            w.add_document(doc)
            out.append(doc)
    return out


def write_sft(prefix: Path, samples_per_doc: list[int], *, vocab: int, seq_len: int | None, packed: bool,
              seed: int = 0, max_len: int = 12) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """One document per entry of `samples_per_doc`, each sample a random prompt (labels -100) + answer;
    returns [[(ids, labels) per sample] per document]."""
    rng = np.random.default_rng(seed)
    docs = []
    with IndexedWriter(str(prefix) + "_input_ids_document", np.int32) as wi, \
            IndexedWriter(str(prefix) + "_labels_document", np.int32) as wl:
        for n in samples_per_doc:
            samples = []
            for _ in range(n):
                prompt = rng.integers(3, vocab, int(rng.integers(1, max_len // 2)))
                answer = np.concatenate([rng.integers(3, vocab, int(rng.integers(1, max_len // 2))), [EOD]])
                ids = np.concatenate([prompt, answer]).astype(np.int64)
                labels = np.concatenate([np.full(len(prompt), -100), answer]).astype(np.int64)
                samples.append((ids, labels))
            lengths = [len(s[0]) for s in samples]
            wi.add_document(np.concatenate([s[0] for s in samples]), lengths)
            wl.add_document(np.concatenate([s[1] for s in samples]), lengths)
            docs.append(samples)
    Path(str(prefix) + "_meta.json").write_text(json.dumps({"kind": "sft", "packed": packed, "seq_len": seq_len}))
    return docs
