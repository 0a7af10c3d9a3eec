"""Conversations -> (input_ids, labels): the tokenizer's chat template, or the built-in Alpaca template.

Both take a validated conversation (an optional system message, then user/assistant turns) and a
per-message `train` flag, and return token ids with labels that equal the ids on trained tokens and
IGNORE_INDEX elsewhere (not shifted: the trainer shifts).

`ChatTemplate` (the tokenizer's own, via `apply_chat_template`) finds each assistant turn's tokens by
rendering the template incrementally: turn i spans from the end of `render(messages[:i],
add_generation_prompt=True)` to the end of `render(messages[:i+1])`. The whole conversation is
tokenized once and each of those prefix renderings must tokenize to an exact token prefix of it. A
template that breaks this (one that rewrites earlier turns once later ones exist, e.g. drops past
reasoning, or whose generation prompt differs from how it renders an assistant turn) gives no
well-defined mask, so the record is skipped as `unstable_template` (an error under --strict),
naming the message where the prefix breaks. Whatever the template puts after an assistant message
(its end-of-turn token, EOS) is trained with it.

`AlpacaTemplate` is the Stanford Alpaca prompt, for tokenizers without a chat template:

    {system}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}<EOS>### Instruction:\\n...

with the Alpaca preamble as the default system text and an Alpaca `input` joined to the instruction
as "\\n\\n### Input:\\n{input}". Each piece is tokenized on its own; the assistant text and the EOS
after it are trained, the rest is masked. No BOS is added (as in `preprocess pretrain`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal, Protocol

from graphllm.data.encoders import Encoder, HuggingFaceEncoder
from graphllm.data.records import Malformed
from graphllm.errors import GraphllmError
from graphllm.models.llama import IGNORE_INDEX

__all__ = ["ALPACA_SYSTEM", "IGNORE_INDEX", "AlpacaTemplate", "ChatTemplate", "Template", "make_template"]

ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
ALPACA_USER = "### Instruction:\n{content}\n\n### Response:\n"
TEMPLATE_CHOICES = ("alpaca",)
ERROR_CHARS = 200  # a template's own error message is cut to this many characters


class Template(Protocol):
    name: str
    input_join: str
    """How an Alpaca record's `input` is appended to its `instruction`."""

    def encode(self, messages: list[dict], train: list[bool]) -> tuple[list[int], list[int]]: ...

    def prompt(self, messages: list[dict]) -> list[int]:
        """Ids of `messages` followed by the start of an assistant turn (everything masked)."""


class AlpacaTemplate:
    name = "alpaca"
    input_join = "\n\n### Input:\n"

    def __init__(self, encoder: Encoder) -> None:
        if encoder.eos_id is None:
            raise GraphllmError(f"--tokenizer {encoder.spec} has no EOS token to end each response; "
                                "use a tokenizer that defines one")
        self._enc, self._eos = encoder, encoder.eos_id
        self._encode_fixed = lru_cache(maxsize=64)(encoder.encode)  # the system text repeats

    def _pieces(self, messages: list[dict]) -> list[tuple[list[int], bool, int]]:
        """(ids, is_assistant, message index) per rendered piece; the system piece always comes first."""
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ALPACA_SYSTEM
        pieces = [(self._encode_fixed(system + "\n\n"), False, -1)]
        for i, m in enumerate(messages):
            if m["role"] == "user":
                pieces.append((self._enc.encode(ALPACA_USER.format(content=m["content"])), False, i))
            elif m["role"] == "assistant":
                pieces.append((self._enc.encode(m["content"]) + [self._eos], True, i))
        return pieces

    def encode(self, messages: list[dict], train: list[bool]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for piece, assistant, i in self._pieces(messages):
            ids += piece
            labels += piece if assistant and train[i] else [IGNORE_INDEX] * len(piece)
        return ids, labels

    def prompt(self, messages: list[dict]) -> list[int]:
        return [t for piece, _, _ in self._pieces(messages) for t in piece]


class ChatTemplate:
    name = "chat"
    input_join = "\n\n"

    def __init__(self, encoder: HuggingFaceEncoder) -> None:
        self._enc = encoder

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._enc.render_chat(messages, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja2.TemplateError, raise_exception(...) in the template, ...
            msg = " ".join(str(exc).split())[:ERROR_CHARS]
            raise Malformed("template_error", f"the chat template failed ({type(exc).__name__}: {msg})") from exc

    def encode(self, messages: list[dict], train: list[bool]) -> tuple[list[int], list[int]]:
        full = self._render(messages, False)
        ids = self._enc.encode(full)
        labels = [IGNORE_INDEX] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or not train[i]:
                continue
            start = self._prefix_len(self._render(messages[:i], True), full, ids, i, "with the generation prompt")
            end = (len(ids) if i + 1 == len(messages)
                   else self._prefix_len(self._render(messages[:i + 1], False), full, ids, i + 1, ""))
            labels[start:end] = ids[start:end]
        return ids, labels

    def _prefix_len(self, text: str, full: str, ids: list[int], n: int, how: str) -> int:
        """len(tokens(text)), checked to be a token prefix of the whole conversation's tokens."""
        where = f"the first {n} message(s) rendered {how}".rstrip()
        if not full.startswith(text):
            raise Malformed("unstable_template", f"chat template is not prefix-stable: {where} is not a text "
                                                 "prefix of the whole conversation")
        prefix = self._enc.encode(text)
        if ids[:len(prefix)] != prefix:
            raise Malformed("unstable_template", f"chat template is not prefix-stable: {where} does not "
                                                 "tokenize to a prefix of the whole conversation's tokens")
        return len(prefix)

    def prompt(self, messages: list[dict]) -> list[int]:
        return self._enc.encode(self._render(messages, True))


def make_template(encoder: Encoder, choice: Literal["auto", "chat", "alpaca"], *, fallback: bool) -> Template:
    """The template for `choice`; "auto" is the tokenizer's chat template, or Alpaca when `fallback`."""
    if choice not in ("auto", "chat", *TEMPLATE_CHOICES):
        raise GraphllmError(f"--prompt-template {choice!r} is unknown; use one of {', '.join(TEMPLATE_CHOICES)}")
    if choice == "alpaca" or (choice == "auto" and fallback and encoder.chat_template is None):
        return AlpacaTemplate(encoder)
    if encoder.chat_template is None or not isinstance(encoder, HuggingFaceEncoder):
        raise GraphllmError(f"--tokenizer {encoder.spec} has no chat template; pass a Hugging Face tokenizer "
                            "directory with a chat_template, or use --prompt-template alpaca")
    return ChatTemplate(encoder)
