"""Built-in data: stdlib corpus, sentencepiece tokenizer, token batches, atomic cache.

All tests share one cache folder (`data_cache`), so the corpus is extracted (~5 s) and the default
8000-piece tokenizer trained (<1 s) once per session. Reproduce with `pytest tests/test_data.py -q`.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from graphllm.data import (
    BatchSpec,
    TokenBatches,
    atomic_write,
    builtin_documents,
    builtin_token_ids,
    builtin_tokenizer,
    cache_dir,
    load_tokenizer,
)
from graphllm.data.cache import ENV_VAR
from graphllm.data.corpus import (
    corpus_path,
    extract_documents,
    stdlib_root,
    stdlib_sources,
)
from graphllm.data.tokenizer import builtin_tokenizer_path, train_tokenizer_model
from graphllm.errors import GraphllmError

SMALL_VOCAB = 1000


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("graphllm-cache")
    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = str(root)
    yield root
    if old is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = old


@pytest.fixture(scope="session")
def documents(data_cache) -> list[str]:
    return builtin_documents()


@pytest.fixture(scope="session")
def tokenizer(documents):
    return builtin_tokenizer()  # the default vocab_size=8000: training takes well under a second


@pytest.fixture(scope="session")
def token_ids(tokenizer) -> np.ndarray:
    return builtin_token_ids(tokenizer)


# --- cache -----------------------------------------------------------------------------------------

def test_cache_dir_is_under_env_root_and_created(data_cache):
    path = cache_dir("a", "b")
    assert path == data_cache / "a" / "b" and path.is_dir()


def test_atomic_write_bytes_and_callback(data_cache):
    target = cache_dir("atomic") / "x.bin"
    atomic_write(target, b"one")
    atomic_write(target, lambda tmp: tmp.write_bytes(b"two"))  # overwrite: the later replace wins
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]  # no temp file left behind


def test_atomic_write_failure_leaves_nothing(data_cache):
    target = cache_dir("atomic-fail") / "y.bin"

    def crash(tmp: Path) -> None:
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("simulated crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert list(target.parent.iterdir()) == []


def test_concurrent_writers_leave_one_complete_file(data_cache):
    # Builders racing on the same artifact: each writes its own temp file, the last replace wins.
    target = cache_dir("atomic-race") / "z.bin"
    payloads = [bytes([k]) * 1_000_000 for k in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda k: [atomic_write(target, payloads[k]) for _ in range(10)], range(4)))
    assert target.read_bytes() in payloads
    assert sorted(p.name for p in target.parent.iterdir()) == ["z.bin"]


def test_leftover_temp_file_is_ignored(documents):
    # A crashed earlier build left a half-written temp file beside the model; it must not be read.
    path = builtin_tokenizer_path(SMALL_VOCAB)
    leftover = path.with_name(path.name + ".tmp-crashed")
    leftover.write_bytes(b"\x0a\x05trunc")
    tok = builtin_tokenizer(SMALL_VOCAB)
    assert tok.path == path and tok.vocab_size == SMALL_VOCAB
    assert leftover.read_bytes() == b"\x0a\x05trunc"  # untouched, never mistaken for the model


# --- corpus ----------------------------------------------------------------------------------------

def test_documents_nonempty_and_cached_copy_equal(documents):
    assert len(documents) > 1000
    assert sum(len(d) for d in documents) > 1_000_000
    assert all(len(d) >= 40 for d in documents)
    assert corpus_path().exists()
    assert builtin_documents() == documents  # read back from the cache file: same list


def test_extraction_is_deterministic_and_skips_tests():
    subdir = stdlib_root() / "json"
    assert extract_documents(subdir) == extract_documents(subdir) != []
    skipped = {"test", "tests", "idlelib", "lib2to3", "site-packages"}
    assert not any(skipped & set(p.relative_to(stdlib_root()).parts) for p in stdlib_sources())


# --- tokenizer -------------------------------------------------------------------------------------

ROUND_TRIP_TEXTS = [
    "",
    "def f(x):\n    return x  # comment\n",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n\n",
    "digits 1234567890 and 3.14159e-10",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🎉👍🏽👨‍👩‍👧‍👦 flags 🇫🇷",
    "combining e\u0301 vs \u00e9, ligature \ufb01, fullwidth ＡＢＣ, NBSP\u00a0here",
    "control \x00\x01\x7f and zero-width \u200b\u200d joiners",
    "▁ literal sentencepiece space mark ▁▁",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_round_trip_random_unicode(tokenizer):
    rng = random.Random(0)
    # Every code point except surrogates (not encodable as UTF-8, so not valid text).
    def char() -> str:
        while True:
            cp = rng.randrange(0x110000) if rng.random() < 0.3 else rng.randrange(0x20, 0x3000)
            if not 0xD800 <= cp <= 0xDFFF:
                return chr(cp)
    texts = ["".join(char() for _ in range(rng.randrange(1, 60))) for _ in range(300)]
    texts += ["a\u2581b", "\u2581\u2581 x\u2581"]  # literal space marks, via the batched path too
    encoded = tokenizer.encode_batch(texts)
    assert encoded == [tokenizer.encode(t) for t in texts]
    assert [tokenizer.decode(ids) for ids in encoded] == texts


def test_tokenizer_properties(tokenizer):
    assert tokenizer.vocab_size == 8000
    assert len({tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}) == 3
    assert tokenizer.path.exists() and load_tokenizer(tokenizer.path).encode("x y") == tokenizer.encode("x y")


def test_training_is_deterministic(documents):
    assert train_tokenizer_model(documents, SMALL_VOCAB) == train_tokenizer_model(documents, SMALL_VOCAB)


def test_vocab_too_small_is_a_user_error(documents):
    with pytest.raises(GraphllmError, match="vocab_size=100"):
        train_tokenizer_model(documents, 100)


def test_corrupt_or_missing_tokenizer_file(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(GraphllmError, match="bad.model"):
        load_tokenizer(bad)
    with pytest.raises(GraphllmError, match="missing.model"):
        load_tokenizer(tmp_path / "missing.model")


# --- token ids and batches -------------------------------------------------------------------------

def test_token_ids_cached_and_eos_per_document(tokenizer, token_ids, documents):
    assert token_ids.dtype == np.int32 and token_ids.ndim == 1
    assert int((token_ids == tokenizer.eos_id).sum()) == len(documents)
    assert token_ids.min() >= 0 and token_ids.max() < tokenizer.vocab_size
    first_end = int(np.argmax(token_ids == tokenizer.eos_id))
    assert tokenizer.decode(token_ids[:first_end].tolist()) == documents[0]
    assert np.array_equal(builtin_token_ids(tokenizer), token_ids)  # second call: the cached .npy


def test_train_batch_deterministic_and_shifted(tokenizer, token_ids):
    spec = BatchSpec(batch_size=4, seq_len=32, seed=3)
    a, b = TokenBatches(token_ids, spec), TokenBatches(token_ids, spec)
    x, y = a.train_batch(7)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x, b.train_batch(7)[0]) and torch.equal(y, b.train_batch(7)[1])  # resume-exact
    assert not torch.equal(x, a.train_batch(8)[0])
    other_seed = TokenBatches(token_ids, BatchSpec(batch_size=4, seq_len=32, seed=4))
    assert not torch.equal(x, other_seed.train_batch(7)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row, start in enumerate(a.train_starts(7)):  # labels are the token after each input
        assert torch.equal(y[row], torch.from_numpy(token_ids[start + 1:start + 33].astype(np.int64)))
    assert 0 <= int(x.min()) and int(y.max()) < tokenizer.vocab_size


def test_train_windows_stay_inside_train_split(token_ids):
    spec = BatchSpec(batch_size=64, seq_len=128, valid_fraction=0.05)
    batches = TokenBatches(token_ids, spec)
    assert len(batches.train_ids) + len(batches.valid_ids) == len(token_ids)
    assert np.array_equal(batches.valid_ids, token_ids[len(batches.train_ids):])
    ends = np.concatenate([batches.train_starts(step) for step in range(200)]) + spec.seq_len + 1
    assert ends.max() <= len(batches.train_ids)


def test_valid_batches_fixed_and_from_valid_split(token_ids):
    spec = BatchSpec(batch_size=2, seq_len=16)
    batches = TokenBatches(token_ids, spec)
    first = batches.valid_batches(3)
    again = TokenBatches(token_ids, spec).valid_batches(3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    x, y = first[1]
    offset = len(batches.train_ids) + 2 * 16  # batch 1, row 0 = third window of the valid split
    assert torch.equal(x[0], torch.from_numpy(token_ids[offset:offset + 16].astype(np.int64)))
    assert torch.equal(y[0], torch.from_numpy(token_ids[offset + 1:offset + 17].astype(np.int64)))
    with pytest.raises(GraphllmError, match="valid_batches"):
        batches.valid_batches(batches.num_valid_batches + 1)


def test_short_corpus_names_seq_len():
    with pytest.raises(GraphllmError, match="seq_len=64"):
        TokenBatches(np.arange(50, dtype=np.int32), BatchSpec(batch_size=1, seq_len=64, valid_fraction=0.0))
    # train fits, the 1% valid split does not: training runs, validating says why it cannot
    batches = TokenBatches(np.arange(1000, dtype=np.int32), BatchSpec(batch_size=1, seq_len=64))
    assert batches.train_starts(0).shape == (1,)
    with pytest.raises(GraphllmError, match="seq_len=64"):
        batches.valid_batches(1)


@pytest.mark.parametrize("field, kwargs", [
    ("batch_size", {"batch_size": 0, "seq_len": 8}),
    ("seq_len", {"batch_size": 1, "seq_len": 0}),
    ("valid_fraction", {"batch_size": 1, "seq_len": 8, "valid_fraction": 1.0}),
])
def test_bad_spec_names_field(field, kwargs):
    with pytest.raises(GraphllmError, match=field):
        TokenBatches(np.arange(100, dtype=np.int32), BatchSpec(**kwargs))
