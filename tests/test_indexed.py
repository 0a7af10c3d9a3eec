"""Megatron MMapIndexedDataset (.bin + .idx): round trip, byte parity with megatron-core both ways,
streaming memory, atomic writes, and corrupt inputs. Reproduce with `pytest tests/test_indexed.py -q`.

megatron-core==0.16.1 is in the `test` extra, so the parity tests always run.
"""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core warns about optional GPU packages on import
    from megatron.core.datasets.indexed_dataset import (
        IndexedDataset,
        IndexedDatasetBuilder,
    )

from graphllm.data import DTYPE_CODES, IndexedReader, IndexedWriter, best_dtype
from graphllm.errors import GraphllmError


def _docs(vocab: int, seed: int = 0) -> list[tuple[np.ndarray, list[int] | None]]:
    """Documents with one or several sequences, including a 1-token doc and a 0-length sequence."""
    rng = np.random.default_rng(seed)
    docs: list[tuple[np.ndarray, list[int] | None]] = [
        (np.array([vocab - 1]), None),                       # 1-token document, largest id
        (rng.integers(0, vocab, 10), [3, 7]),                # two sequences
        (rng.integers(0, vocab, 6), [1, 0, 5]),              # a zero-length sequence in the middle
    ]
    for _ in range(20):
        n = int(rng.integers(1, 50))
        docs.append((rng.integers(0, vocab, n), None))
    docs.append((rng.integers(0, vocab, 12), [4, 4, 4]))
    return docs


def _expected(docs) -> tuple[list[list[int]], list[int]]:
    seqs, doc_idx = [], [0]
    for tokens, lengths in docs:
        lengths = lengths or [len(tokens)]
        start = 0
        for n in lengths:
            seqs.append(tokens[start:start + n].tolist())
            start += n
        doc_idx.append(len(seqs))
    return seqs, doc_idx


def _write_graphllm(prefix, docs, dtype) -> None:
    with IndexedWriter(prefix, dtype) as w:
        for tokens, lengths in docs:
            w.add_document(tokens, lengths)


def _write_megatron(prefix, docs, dtype) -> None:
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for tokens, lengths in docs:
        builder.add_document(np.asarray(tokens, dtype=np.int64), lengths or [len(tokens)])
    builder.finalize(str(prefix) + ".idx")


def _read_megatron(prefix) -> tuple[list[list[int]], list[int]]:
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))], ds.document_indices.tolist()


DTYPES = [(np.uint16, 50_000), (np.int32, 200_000)]


def test_dtype_table_and_best_dtype():
    assert DTYPE_CODES[8] == np.uint16 and DTYPE_CODES[4] == np.int32 and len(DTYPE_CODES) == 8
    assert best_dtype(32_000) == np.uint16
    assert best_dtype(65_499) == np.uint16
    assert best_dtype(65_500) == np.int32
    assert best_dtype(128_256) == np.int32


@pytest.mark.parametrize("dtype,vocab", DTYPES)
def test_round_trip(tmp_path, dtype, vocab):
    docs = _docs(vocab)
    _write_graphllm(tmp_path / "ds", docs, dtype)
    r = IndexedReader(tmp_path / "ds")
    seqs, doc_idx = _expected(docs)
    assert len(r) == len(seqs)
    assert [r[i].tolist() for i in range(len(r))] == seqs
    assert r.document_indices.tolist() == doc_idx
    assert r.sequence_lengths.tolist() == [len(s) for s in seqs]
    assert r.num_tokens == sum(len(s) for s in seqs)
    assert r.num_documents == len(docs)
    assert r.dtype == dtype and r[0].dtype == dtype
    assert r[-1].tolist() == seqs[-1]
    assert r.get(1, offset=1, length=2).tolist() == seqs[1][1:3]
    assert r.get(1, offset=2).tolist() == seqs[1][2:]
    assert [s.tolist() for s in r.document(1)] == seqs[1:3]
    # a view into the mapped .bin, not a copy
    assert not r[1].flags.owndata and not r[1].flags.writeable
    with pytest.raises(IndexError):
        r[len(r)]
    with pytest.raises(IndexError):
        r.get(1, offset=2, length=5)


@pytest.mark.parametrize("dtype,vocab", DTYPES)
def test_graphllm_files_read_by_megatron(tmp_path, dtype, vocab):
    docs = _docs(vocab, seed=1)
    _write_graphllm(tmp_path / "g", docs, dtype)
    assert _read_megatron(tmp_path / "g") == _expected(docs)


@pytest.mark.parametrize("dtype,vocab", DTYPES)
def test_megatron_files_read_by_graphllm(tmp_path, dtype, vocab):
    docs = _docs(vocab, seed=2)
    _write_megatron(tmp_path / "m", docs, dtype)
    r = IndexedReader(tmp_path / "m")
    seqs, doc_idx = _expected(docs)
    assert [r[i].tolist() for i in range(len(r))] == seqs
    assert r.document_indices.tolist() == doc_idx
    assert r.dtype == dtype and r.sequence_modes is None


@pytest.mark.parametrize("dtype,vocab", DTYPES)
def test_writers_byte_identical(tmp_path, dtype, vocab):
    docs = _docs(vocab, seed=3)
    _write_graphllm(tmp_path / "g", docs, dtype)
    _write_megatron(tmp_path / "m", docs, dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / ("g" + ext)).read_bytes() == (tmp_path / ("m" + ext)).read_bytes(), ext


def test_megatron_multimodal_modes_are_read(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "mm.bin"), dtype=np.int32, multimodal=True)
    builder.add_item(torch.tensor([1, 2, 3]), mode=0)
    builder.add_item(torch.tensor([4, 5]), mode=1)
    builder.end_document()
    builder.finalize(str(tmp_path / "mm.idx"))
    r = IndexedReader(tmp_path / "mm")
    assert [s.tolist() for s in r] == [[1, 2, 3], [4, 5]]
    assert r.sequence_modes.tolist() == [0, 1]


def test_empty_dataset(tmp_path):
    with IndexedWriter(tmp_path / "e", np.uint16):
        pass
    r = IndexedReader(tmp_path / "e")
    assert len(r) == 0 and r.num_tokens == 0 and r.document_indices.tolist() == [0]


def test_streaming_memory_does_not_grow_with_tokens(tmp_path):
    # 2,000,000 int32 tokens (8 MB) in 10,000 documents of 200 tokens each.
    doc = np.arange(200, dtype=np.int32)
    n_docs = 10_000
    w = IndexedWriter(tmp_path / "big", np.int32)
    for _ in range(100):  # warm up buffers before measuring
        w.add_document(doc)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(n_docs - 100):
            w.add_document(doc)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The writer keeps 4 bytes per sequence + 8 per document (~120 KB here) and streams tokens to disk.
    assert peak - base < 1_000_000, f"writer held {peak - base} bytes for 8 MB of tokens"
    assert current - base < 1_000_000
    assert w.num_sequences == n_docs and w.num_documents == n_docs
    w.finalize()
    r = IndexedReader(tmp_path / "big")
    assert r.num_tokens == 2_000_000
    assert (tmp_path / "big.bin").stat().st_size == 8_000_000
    assert r[n_docs - 1].tolist() == doc.tolist()


def test_exception_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError), IndexedWriter(tmp_path / "x", np.uint16) as w:
        w.add_document([1, 2, 3])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_exception_keeps_existing_files(tmp_path):
    _write_graphllm(tmp_path / "x", [(np.array([7, 8, 9]), None)], np.uint16)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError), IndexedWriter(tmp_path / "x", np.uint16) as w:
        w.add_document(np.arange(1000))
        raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert IndexedReader(tmp_path / "x")[0].tolist() == [7, 8, 9]


def test_writer_rejects_bad_input(tmp_path):
    with IndexedWriter(tmp_path / "w", np.uint16) as w:
        with pytest.raises(GraphllmError, match="do not fit uint16"):
            w.add_document([70_000])
        with pytest.raises(GraphllmError, match="lengths sum to 4"):
            w.add_document([1, 2, 3], lengths=[2, 2])
        with pytest.raises(GraphllmError, match="must be integers"):
            w.add_document([1.5])
        w.add_document([1])
    with pytest.raises(GraphllmError, match="already finalized"):
        w.add_document([1])
    with pytest.raises(GraphllmError, match="no code"):
        IndexedWriter(tmp_path / "w2", np.uint32)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["w.bin", "w.idx"]


@pytest.fixture
def good(tmp_path):
    prefix = tmp_path / "c"
    _write_graphllm(prefix, _docs(1000), np.uint16)
    return prefix


def test_missing_files(good):
    good.with_suffix(".bin").unlink()
    with pytest.raises(GraphllmError, match=r"c\.bin is missing"):
        IndexedReader(good)
    with pytest.raises(GraphllmError, match=r"nope\.idx is missing"):
        IndexedReader(good.parent / "nope")


def test_bad_magic(good):
    idx = good.with_suffix(".idx")
    idx.write_bytes(b"XXXXXXXXX" + idx.read_bytes()[9:])
    with pytest.raises(GraphllmError, match=r"c\.idx has magic"):
        IndexedReader(good)


def test_bad_version_and_dtype_code(good):
    idx = good.with_suffix(".idx")
    raw = bytearray(idx.read_bytes())
    bad = raw.copy()
    bad[9] = 2
    idx.write_bytes(bytes(bad))
    with pytest.raises(GraphllmError, match="version 2"):
        IndexedReader(good)
    bad = raw.copy()
    bad[17] = 99
    idx.write_bytes(bytes(bad))
    with pytest.raises(GraphllmError, match="unknown dtype code 99"):
        IndexedReader(good)


def test_truncated_files(good):
    bin_path, idx = good.with_suffix(".bin"), good.with_suffix(".idx")
    bin_path.write_bytes(bin_path.read_bytes()[:-3])
    with pytest.raises(GraphllmError, match=r"c\.bin is \d+ bytes .* truncated"):
        IndexedReader(good)
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(GraphllmError, match=r"c\.idx is \d+ bytes .* truncated"):
        IndexedReader(good)
    idx.write_bytes(idx.read_bytes()[:20])
    with pytest.raises(GraphllmError, match=r"c\.idx .* header"):
        IndexedReader(good)
