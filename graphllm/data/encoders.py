"""Tokenizers as preprocessing sees them: a spec string -> an object with `encode`, ids and a chat template.

A spec is a sentencepiece `.model` file, a local Hugging Face tokenizer directory (anything
`AutoTokenizer.from_pretrained` loads, chat template included), or `builtin` (graphllm's own BPE
model). Specs are strings so that worker processes can load their own copy: `resolve_spec` turns
`builtin` into its cached model path first, so workers never train anything.

`encoder.fingerprint()` names what the token ids mean: a short hash of the whole vocabulary (every
token -> id) and the bos/eos/pad/unk ids with their strings, in a canonical JSON form, so the same
tokenizer gives the same fingerprint on any machine, whichever file format holds it, and any change
of vocabulary or special tokens gives another. It does not cover how text is split (normalizer,
merges): two tokenizers with one vocabulary produce ids a model reads the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from graphllm.errors import GraphllmError

__all__ = ["BUILTIN", "Encoder", "HuggingFaceEncoder", "SentencePieceEncoder", "load_encoder", "resolve_spec",
           "tokenizer_meta", "tokenizer_record", "vocab_fingerprint"]

BUILTIN = "builtin"
FINGERPRINT_HEX = 16  # 64 bits of sha256: plenty to tell real tokenizers apart, short enough to read
SPECIAL_TOKENS = ("bos", "eos", "pad", "unk")
Special = dict[str, tuple[int, str] | None]


def vocab_fingerprint(vocab: Iterable[tuple[str, int]], special: Special) -> str:
    """The fingerprint of a vocabulary (token, id) and its special tokens (name -> (id, string) or None)."""
    body = {"vocab": sorted([i, t] for t, i in vocab),
            "special": {k: list(v) if v is not None else None for k, v in special.items()}}
    text = json.dumps(body, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_HEX]


class Encoder(Protocol):
    spec: str
    """The tokenizer as the user named it (for messages)."""
    vocab_size: int
    eos_id: int | None
    bos_id: int | None
    chat_template: str | None
    """The tokenizer's Jinja chat template; None when it has none (sentencepiece models never do)."""

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def fingerprint(self) -> str: ...


def tokenizer_record(enc: Encoder, spec: str | None = None) -> dict:
    """What plan.json records of a tokenizer: its spec (default: as the encoder was named), fingerprint, size."""
    return {"spec": spec or enc.spec, "fingerprint": enc.fingerprint(), "vocab_size": enc.vocab_size}


def tokenizer_meta(enc: Encoder, spec: str) -> dict:
    """The same, as `PREFIX_meta.json`'s fields: `tokenizer` (the spec as given), `tokenizer_fingerprint`,
    `vocab_size`."""
    return {"tokenizer": spec, "tokenizer_fingerprint": enc.fingerprint(), "vocab_size": enc.vocab_size}


class SentencePieceEncoder:
    chat_template = None

    def __init__(self, path: Path) -> None:
        from graphllm.data.tokenizer import load_tokenizer

        self.spec = str(path)
        self._tok = load_tokenizer(path)
        self.vocab_size = self._tok.vocab_size
        eos, bos = self._tok.eos_id, self._tok.bos_id
        self.eos_id = eos if eos >= 0 else None
        self.bos_id = bos if bos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok.encode_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def fingerprint(self) -> str:
        return vocab_fingerprint(((p, i) for i, p in enumerate(self._tok.pieces())), self._tok.special_tokens())


class HuggingFaceEncoder:
    def __init__(self, directory: Path) -> None:
        from transformers import AutoTokenizer

        self.spec = str(directory)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError/KeyError... for bad dirs
            raise GraphllmError(f"--tokenizer {directory}: not a loadable Hugging Face tokenizer directory "
                                f"({type(exc).__name__}: {exc}); point to a folder written by save_pretrained") from exc
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id
        self.chat_template = getattr(self._tok, "chat_template", None) or None

    def encode(self, text: str) -> list[int]:
        # Special-token text inside `text` (a chat template's "<|im_start|>") maps to its id, as
        # transformers' own apply_chat_template(tokenize=True) does; no BOS/EOS is added.
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False)["input_ids"]  # a fast tokenizer batches in Rust

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def fingerprint(self) -> str:
        tok = self._tok
        special: Special = {}
        for name in SPECIAL_TOKENS:
            text, i = getattr(tok, f"{name}_token", None), getattr(tok, f"{name}_token_id", None)
            special[name] = (int(i), str(text)) if text is not None and i is not None else None
        return vocab_fingerprint(tok.get_vocab().items(), special)

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        """The chat template applied to `messages`, as text; raises whatever the template raises."""
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def resolve_spec(spec: str) -> str:
    """A spec workers can load without training anything: `builtin` becomes its cached model path."""
    if spec == BUILTIN:
        from graphllm.data.tokenizer import builtin_tokenizer

        return str(builtin_tokenizer().path)
    return spec


def load_encoder(spec: str, name: str | None = None) -> Encoder:
    """The encoder for a resolved `spec`; `name` (default: the spec) is what messages call it."""
    path = Path(spec)
    if not path.exists():
        raise GraphllmError(f"--tokenizer {name or spec}: no such file or directory; pass a sentencepiece .model "
                            "file, a Hugging Face tokenizer directory, or `builtin`")
    enc: Encoder = HuggingFaceEncoder(path) if path.is_dir() else SentencePieceEncoder(path)
    enc.spec = name or spec
    return enc
