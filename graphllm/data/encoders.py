"""Tokenizers as preprocessing sees them: a spec string -> an object with `encode`, ids and a chat template.

A spec is a sentencepiece `.model` file, a local Hugging Face tokenizer directory (anything
`AutoTokenizer.from_pretrained` loads, chat template included), or `builtin` (graphllm's own BPE
model). Specs are strings so that worker processes can load their own copy: `resolve_spec` turns
`builtin` into its cached model path first, so workers never train anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from graphllm.errors import GraphllmError

__all__ = ["Encoder", "HuggingFaceEncoder", "SentencePieceEncoder", "load_encoder", "resolve_spec"]


class Encoder(Protocol):
    spec: str
    """The tokenizer as the user named it (for messages)."""
    vocab_size: int
    eos_id: int | None
    chat_template: str | None
    """The tokenizer's Jinja chat template; None when it has none (sentencepiece models never do)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceEncoder:
    chat_template = None

    def __init__(self, path: Path) -> None:
        from graphllm.data.tokenizer import load_tokenizer

        self.spec = str(path)
        self._tok = load_tokenizer(path)
        self.vocab_size = self._tok.vocab_size
        eos = self._tok.eos_id
        self.eos_id = eos if eos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


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
        self.chat_template = getattr(self._tok, "chat_template", None) or None

    def encode(self, text: str) -> list[int]:
        # Special-token text inside `text` (a chat template's "<|im_start|>") maps to its id, as
        # transformers' own apply_chat_template(tokenize=True) does; no BOS/EOS is added.
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        """The chat template applied to `messages`, as text; raises whatever the template raises."""
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def resolve_spec(spec: str) -> str:
    """A spec workers can load without training anything: `builtin` becomes its cached model path."""
    if spec == "builtin":
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
