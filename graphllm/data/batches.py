"""Token streams and the (input, label) batches a training loop consumes.

`builtin_token_ids` encodes the built-in corpus once (EOS after every document) and caches it as an
`.npy` file next to the tokenizer; `corpus_token_ids` does the same with any encoder (a model's own
Hugging Face tokenizer), cached under `cache_dir("tokens")` by the encoder's fingerprint. `TokenBatches`
cuts a token stream into a train part and a valid part (the last `valid_fraction`) and serves windows of
`seq_len + 1` tokens: inputs are the first `seq_len`, labels the last `seq_len` (the next token for each
input position).

Train window starts are a pure function of (seed, step, row) — a splitmix64 hash, not a stateful RNG
and not numpy's Generator, whose streams may change between numpy versions — so batch k is the same
in every run, on every machine, and resuming at step k continues exactly where the run stopped.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from graphllm.data.cache import atomic_write, cache_dir, cache_root
from graphllm.data.corpus import builtin_documents, corpus_tag
from graphllm.data.tokenizer import TRAIN_THREADS, Tokenizer
from graphllm.errors import GraphllmError


def builtin_token_ids_path(tokenizer: Tokenizer) -> Path:
    """Beside the tokenizer when it lives in the cache, else under `cache_dir("tokens")`.

    The name carries the corpus tag and a hash of the model file, so neither a replaced model nor a
    different corpus ever reuses stale ids.
    """
    digest = hashlib.sha256(tokenizer.path.read_bytes()).hexdigest()[:16]
    name = f"stdlib-tokens-{corpus_tag()}-{digest}.npy"
    model_dir = tokenizer.path.resolve().parent
    if model_dir.is_relative_to(cache_root().resolve()):
        return model_dir / name
    return cache_dir("tokens") / name  # never write next to a user's own model file


def encode_documents(tokenizer: Tokenizer, documents: list[str]) -> np.ndarray:
    """All documents encoded, each followed by EOS, as one int32 stream."""
    return _join(tokenizer.encode_batch(documents, num_threads=TRAIN_THREADS), tokenizer.eos_id)


def _join(encoded: list[list[int]], eos: int | None) -> np.ndarray:
    """Documents' ids back to back as one int32 stream, each followed by `eos` (None: nothing between)."""
    sep = 0 if eos is None else 1
    lengths = np.fromiter((len(ids) + sep for ids in encoded), dtype=np.int64, count=len(encoded))
    out = np.full(int(lengths.sum()), 0 if eos is None else eos, dtype=np.int32)
    pos = 0
    for ids, n in zip(encoded, lengths):
        out[pos:pos + n - sep] = ids
        pos += n
    return out


def _cached(path: Path, build) -> np.ndarray:
    if path.exists():
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            pass  # unreadable cache (written by hand or a foreign tool): rebuild below, atomically
    ids = build()
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    atomic_write(path, buf.getvalue())
    return ids


def builtin_token_ids(tokenizer: Tokenizer) -> np.ndarray:
    """The built-in corpus encoded with `tokenizer` (int32, EOS after each document); cached."""
    return _cached(builtin_token_ids_path(tokenizer), lambda: encode_documents(tokenizer, builtin_documents()))


def corpus_token_ids(encoder) -> np.ndarray:
    """The built-in corpus encoded with `encoder` (a graphllm.data.encoders.Encoder, e.g. a model's own
    Hugging Face tokenizer): int32, its EOS after each document (nothing between documents when it has
    none). Cached under `cache_dir("tokens")`, keyed by the corpus tag and the encoder's fingerprint."""
    path = cache_dir("tokens") / f"stdlib-tokens-{corpus_tag()}-fp{encoder.fingerprint()}.npy"
    return _cached(path, lambda: _join(encoder.encode_batch(builtin_documents()), encoder.eos_id))


@dataclass(kw_only=True, slots=True)
class BatchSpec:
    batch_size: int
    """Rows per batch (B)."""
    seq_len: int
    """Tokens per row (S); each row reads S + 1 tokens so labels are inputs shifted by one."""
    seed: int = 0
    """With the step number, fixes which windows a train batch holds."""
    valid_fraction: float = 0.01
    """Share of the stream, taken from its end, kept out of training for validation."""


_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 (wrapping arithmetic is intended)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class TokenBatches:
    """Deterministic train batches by step, and a fixed list of validation batches."""

    def __init__(self, token_ids: np.ndarray, spec: BatchSpec) -> None:
        token_ids = np.asarray(token_ids)
        if token_ids.ndim != 1 or not np.issubdtype(token_ids.dtype, np.integer):
            raise GraphllmError(f"token_ids must be a 1-D integer array, got shape {token_ids.shape} "
                                f"dtype {token_ids.dtype}")
        if spec.batch_size < 1:
            raise GraphllmError(f"batch_size must be at least 1, got {spec.batch_size}")
        if spec.seq_len < 1:
            raise GraphllmError(f"seq_len must be at least 1, got {spec.seq_len}")
        if not 0.0 <= spec.valid_fraction < 1.0:
            raise GraphllmError(f"valid_fraction must be in [0, 1), got {spec.valid_fraction}")
        self.spec = spec
        n_valid = int(len(token_ids) * spec.valid_fraction)
        self.train_ids = token_ids[:len(token_ids) - n_valid]
        self.valid_ids = token_ids[len(token_ids) - n_valid:]
        window = spec.seq_len + 1
        if len(self.train_ids) < window:
            raise GraphllmError(
                f"seq_len={spec.seq_len} needs {window} tokens per row but the train split has "
                f"{len(self.train_ids)} (of {len(token_ids)} tokens, valid_fraction={spec.valid_fraction}); "
                f"lower seq_len or use a larger corpus")
        # a valid split too short for one row matters only to a run that validates: valid_batches says so
        self._num_starts = len(self.train_ids) - window + 1  # window starts that stay inside train

    def train_starts(self, step: int) -> np.ndarray:
        """Window start offsets [B] into the train split for `step` (a pure function of seed, step)."""
        if step < 0:
            raise GraphllmError(f"step must be >= 0, got {step}")
        key = _splitmix64(np.array([(self.spec.seed * 0x632BE59BD9B4E019) & _MASK64], dtype=np.uint64))
        key = _splitmix64(key ^ np.uint64(step & _MASK64))
        rows = np.arange(self.spec.batch_size, dtype=np.uint64)
        draws = _splitmix64(key + rows * np.uint64(0xD1B54A32D192ED03))
        return (draws % np.uint64(self._num_starts)).astype(np.int64)

    def _gather(self, ids: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx_BW = starts[:, None] + np.arange(self.spec.seq_len + 1)  # [batch, seq_len + 1]
        window_BW = torch.from_numpy(ids[idx_BW].astype(np.int64))
        return window_BW[:, :-1].contiguous(), window_BW[:, 1:].contiguous()  # [B, S] inputs, labels

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), both LongTensor[batch_size, seq_len]; the same for the same step."""
        return self._gather(self.train_ids, self.train_starts(step))

    @property
    def num_valid_batches(self) -> int:
        """How many disjoint validation batches the valid split holds."""
        if not len(self.valid_ids):
            return 0
        windows = (len(self.valid_ids) - 1) // self.spec.seq_len
        return windows // self.spec.batch_size

    def valid_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `n` validation batches: consecutive windows from the start of the valid split.

        Windows step by seq_len, so every valid token after the first is a label exactly once.
        """
        if n > self.num_valid_batches:
            raise GraphllmError(
                f"valid_batches(n={n}) needs {n * self.spec.batch_size} rows of seq_len={self.spec.seq_len} but "
                f"the valid split ({len(self.valid_ids)} tokens, valid_fraction={self.spec.valid_fraction}) "
                f"holds {self.num_valid_batches} batches; lower n or raise valid_fraction")
        rows = np.arange(n * self.spec.batch_size, dtype=np.int64) * self.spec.seq_len
        return [self._gather(self.valid_ids, rows[i * self.spec.batch_size:(i + 1) * self.spec.batch_size])
                for i in range(n)]
