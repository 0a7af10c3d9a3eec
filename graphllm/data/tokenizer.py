"""A sentencepiece tokenizer, and the built-in one trained on the built-in corpus.

The built-in model is BPE with byte fallback and identity normalization, whitespace kept as is, no
dummy prefix and `\\n` a piece of its own, so `decode(encode(text)) == text` for any Unicode string:
characters the model never saw become UTF-8 byte pieces, and a literal U+2581 (sentencepiece's own
space mark, which it would decode as " ") is encoded as its three byte pieces by `Tokenizer.encode`.
Training is deterministic (no input shuffling, fixed corpus order; sentencepiece's BPE trainer gives
byte-identical models run to run) and takes well under a second on 2 cores for the ~3.7 MB stdlib
corpus; the model is cached and written atomically.

The cache folder is keyed by Python major.minor (not the patch release, so an interpreter update does
not silently swap the vocabulary under existing checkpoints); `tokenizer.path` is the file to keep
with a checkpoint.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from graphllm.data.cache import atomic_write, cache_dir
from graphllm.data.corpus import CORPUS_FORMAT, builtin_documents
from graphllm.errors import GraphllmError

DEFAULT_VOCAB_SIZE = 8000
MIN_VOCAB_SIZE = 512  # 256 byte pieces + specials + the corpus' distinct characters must fit
TRAIN_THREADS = 2
# Cap on training lines, so a larger corpus never makes training slow; the stdlib corpus has ~85k
# lines, all used. Lines are taken in corpus order (shuffle off) to stay deterministic.
MAX_TRAIN_LINES = 1_000_000
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
RECIPE_VERSION = 1  # bump when the training settings below change, so old cached models are not reused
SPACE_MARK = "\u2581"  # sentencepiece writes spaces as this; a literal one in text needs escaping


class Tokenizer:
    """A loaded sentencepiece model. `encode` adds no BOS/EOS; callers add what they need."""

    __slots__ = ("_mark_ids", "_sp", "path")

    def __init__(self, path: Path, processor: spm.SentencePieceProcessor) -> None:
        self.path = path
        self._sp = processor
        self._mark_ids = self._space_mark_bytes()

    def _space_mark_bytes(self) -> list[int] | None:
        """Byte-piece ids spelling U+2581, when the model can splice them in exactly.

        That needs byte pieces and encodings that concatenate (no dummy prefix: encode("a") +
        encode("b") must decode to "ab"). Other models keep sentencepiece's behaviour: a literal
        U+2581 decodes as a space.
        """
        sp = self._sp
        ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode("utf-8")]
        if not all(sp.is_byte(i) for i in ids) or sp.decode(sp.encode("a") + sp.encode("b")) != "ab":
            return None
        return ids

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """-1 when the model has no pad piece (sentencepiece's default); the built-in one has 3."""
        return self._sp.pad_id()

    def pieces(self) -> list[str]:
        """Every piece, by id (`pieces()[i]` is id i's piece)."""
        return self._sp.id_to_piece(list(range(self.vocab_size)))

    def special_tokens(self) -> dict[str, tuple[int, str] | None]:
        """bos/eos/pad/unk as (id, piece); None for one the model does not define (id -1)."""
        sp = self._sp
        ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
        return {name: (i, sp.id_to_piece(i)) if i >= 0 else None for name, i in ids.items()}

    def encode(self, text: str) -> list[int]:
        if self._mark_ids is None or SPACE_MARK not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE_MARK)):
            if i:
                ids.extend(self._mark_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = TRAIN_THREADS) -> list[list[int]]:
        """`[encode(t) for t in texts]`, in sentencepiece's C++ thread pool."""
        texts = list(texts)
        out = self._sp.encode(texts, num_threads=num_threads)
        if self._mark_ids is not None:
            for i, text in enumerate(texts):
                if SPACE_MARK in text:
                    out[i] = self.encode(text)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load a sentencepiece `.model` file."""
    path = Path(path)
    if not path.is_file():
        raise GraphllmError(f"tokenizer file {path} does not exist; pass the path of a sentencepiece "
                            f".model file, or use the built-in tokenizer")
    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(path))
    except (RuntimeError, OSError) as exc:
        raise GraphllmError(f"tokenizer file {path} is not a valid sentencepiece model ({exc}); "
                            f"delete it to rebuild a cached one, or point to a good .model file") from exc
    return Tokenizer(path, processor)


def builtin_tokenizer_path(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    tag = f"stdlib-bpe-{vocab_size}-py{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir("tokenizer", tag) / f"tokenizer-t{RECIPE_VERSION}-c{CORPUS_FORMAT}.model"


def _training_lines(documents: list[str]) -> list[str]:
    # sentencepiece trains on lines: newlines cannot be inside a training sentence, they get their
    # own piece through user_defined_symbols instead.
    lines = [line for doc in documents for line in doc.split("\n") if line.strip()]
    return lines[:MAX_TRAIN_LINES]


def train_tokenizer_model(documents: list[str], vocab_size: int) -> bytes:
    """Train the built-in BPE recipe on `documents`; returns the serialized model."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise GraphllmError(f"vocab_size={vocab_size} is too small for a byte-fallback tokenizer; "
                            f"use at least {MIN_VOCAB_SIZE}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_lines(documents)), model_writer=model,
            model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True,  # any text round-trips: unseen characters become UTF-8 bytes
            normalization_rule_name="identity", remove_extra_whitespaces=False,  # exact round trip
            add_dummy_prefix=False,  # so encodings concatenate exactly (see Tokenizer.encode)
            allow_whitespace_only_pieces=True,  # runs of indentation spaces become single pieces
            user_defined_symbols=["\n"], split_digits=True, character_coverage=0.9995,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            input_sentence_size=MAX_TRAIN_LINES, shuffle_input_sentence=False,  # deterministic
            num_threads=TRAIN_THREADS, minloglevel=2)
    except RuntimeError as exc:
        raise GraphllmError(f"sentencepiece could not train a tokenizer with vocab_size={vocab_size}: "
                            f"{exc}; try a vocab_size between {MIN_VOCAB_SIZE} and 32000") from exc
    return model.getvalue()


def builtin_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """The BPE tokenizer trained on `builtin_documents()`; trained once, then loaded from the cache."""
    path = builtin_tokenizer_path(vocab_size)
    if not path.exists():
        atomic_write(path, train_tokenizer_model(builtin_documents(), vocab_size))
    return load_tokenizer(path)
