"""Process-reward (PRM) records -> (input_ids, labels) with one label per reasoning step.

Token layout (Math-Shepherd style: the model learns to say "+" or "-" where each step ends):

    input_ids: [prompt ...] [step 1 ...] [TAG] [SEP] [step 2 ...] [TAG] [SEP] ... [step n ...] [TAG]
    labels:    -100 ...      -100 ...    GOOD|BAD -100  -100 ...   GOOD|BAD ...     -100 ...   GOOD|BAD

TAG is the step tag (`--step-tag`, default " ки", any number of tokens); the label sits on its first
token and is the id of the good token ("+") for a correct step or of the bad token ("-") for a wrong
one; every other position, the rest of a multi-token tag included, is IGNORE_INDEX. Labels are not
shifted, as for SFT: after the trainer's shift the logits at a step's last token are trained to put
the GOOD/BAD token where the tag is, i.e. "is this step right?" is read as p(+) against p(-) at the
position just before each tag. The meta file records the tag, good and bad ids.

Two record forms:
- structured: `question` (or `prompt`: a string or messages ending with a user turn), `steps`
  [str, ...], `labels` [+/-, 1/0 or true/false per step], optional `system`. The prompt is the
  template's prompt (chat template with its generation prompt, or the Alpaca prompt); steps follow
  as raw text, joined by SEP (`--step-sep`, default "\\n", masked).
- Math-Shepherd: `input` (text with the step tag after each step) and `label` (the same text with
  each tag's marker replaced by "+" or "-", the whitespace around it kept: " ки" -> " +"); no
  template, the text is used as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphllm.data.conversations import prompt_messages, string_field
from graphllm.data.encoders import Encoder
from graphllm.data.records import Malformed
from graphllm.data.templates import IGNORE_INDEX, Template
from graphllm.errors import GraphllmError

__all__ = ["PrmTokens", "encode_prm"]

GOOD_STRINGS, BAD_STRINGS = ("+", "1", "true"), ("-", "0", "false")


@dataclass(kw_only=True, slots=True)
class PrmTokens:
    tag: list[int]
    sep: list[int]
    good: int
    bad: int

    @classmethod
    def build(cls, encoder: Encoder, *, step_tag: str, step_sep: str, good: str, bad: str) -> PrmTokens:
        tag = encoder.encode(step_tag)
        if not step_tag or not tag:
            raise GraphllmError(f"--step-tag {step_tag!r} encodes to no tokens with {encoder.spec}; pass a visible marker")
        ids = {}
        for flag, text in (("--good-token", good), ("--bad-token", bad)):
            enc = encoder.encode(text)
            if len(enc) != 1:
                raise GraphllmError(f"{flag} {text!r} is {len(enc)} tokens with {encoder.spec}, not one; "
                                    "pick a string that is a single token")
            ids[flag] = enc[0]
        if ids["--good-token"] == ids["--bad-token"]:
            raise GraphllmError(f"--good-token {good!r} and --bad-token {bad!r} are the same token; pick two different ones")
        return cls(tag=tag, sep=encoder.encode(step_sep) if step_sep else [],
                   good=ids["--good-token"], bad=ids["--bad-token"])


def _is_good(value, k: int) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in GOOD_STRINGS + BAD_STRINGS:
        return value.strip().lower() in GOOD_STRINGS
    raise Malformed("bad_label", f"labels[{k}] is {value!r}; use +/-, 1/0 or true/false")


def _tagged(ids: list[int], labels: list[int], toks: PrmTokens, good: bool) -> None:
    labels += [toks.good if good else toks.bad] + [IGNORE_INDEX] * (len(toks.tag) - 1)
    ids += toks.tag


def _structured(obj: dict, encoder: Encoder, template: Template, toks: PrmTokens) -> tuple[list[int], list[int]]:
    prompt = prompt_messages(obj, "question" if "question" in obj else "prompt")
    steps, marks = obj["steps"], obj.get("labels")
    if marks is None:
        raise Malformed("missing_key", "missing key 'labels' (one per step)")
    if not isinstance(steps, list) or not isinstance(marks, list):
        raise Malformed("wrong_type", "'steps' and 'labels' must be lists")
    if not steps:
        raise Malformed("empty_conversation", "'steps' is empty")
    if len(steps) != len(marks):
        raise Malformed("label_count", f"{len(steps)} steps but {len(marks)} labels")
    ids = template.prompt(prompt)
    labels = [IGNORE_INDEX] * len(ids)
    for k, (step, mark) in enumerate(zip(steps, marks, strict=True)):
        if not isinstance(step, str) or not step.strip():
            raise Malformed("not_string" if not isinstance(step, str) else "empty_text", f"steps[{k}] is not a non-empty string")
        good = _is_good(mark, k)
        if k:
            ids += toks.sep
            labels += [IGNORE_INDEX] * len(toks.sep)
        piece = encoder.encode(step)
        ids += piece
        labels += [IGNORE_INDEX] * len(piece)
        _tagged(ids, labels, toks, good)
    return ids, labels


def _math_shepherd(obj: dict, encoder: Encoder, toks: PrmTokens, step_tag: str) -> tuple[list[int], list[int]]:
    text, label = string_field(obj, "input"), string_field(obj, "label")
    parts = text.split(step_tag)
    core = step_tag.strip()
    lead = step_tag[:step_tag.index(core)]
    trail = step_tag[len(lead) + len(core):]
    if len(parts) < 2:
        raise Malformed("label_count", f"'input' holds no step tag {step_tag!r}")
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for k, part in enumerate(parts):
        if not label.startswith(part, pos):
            raise Malformed("label_mismatch", f"'label' differs from 'input' before step tag {k + 1}")
        pos += len(part)
        piece = encoder.encode(part) if part else []
        ids += piece
        labels += [IGNORE_INDEX] * len(piece)
        if k + 1 < len(parts):
            # the label text has the tag's marker replaced by + or -, whitespace around it kept
            if not label.startswith(lead, pos):
                raise Malformed("label_mismatch", f"'label' differs from 'input' at step tag {k + 1}")
            pos += len(lead)
            mark = label[pos:pos + 1]
            if mark not in ("+", "-"):
                raise Malformed("bad_label", f"'label' has {mark!r} where step tag {k + 1} is; use + or -")
            pos += 1
            if not label.startswith(trail, pos):
                raise Malformed("label_mismatch", f"'label' differs from 'input' after step tag {k + 1}")
            pos += len(trail)
            _tagged(ids, labels, toks, mark == "+")
    if pos != len(label):
        raise Malformed("label_mismatch", "'label' is longer than 'input' with its tags replaced")
    return ids, labels


def encode_prm(obj: dict, encoder: Encoder, template: Template, toks: PrmTokens,
               step_tag: str) -> tuple[list[int], list[int]]:
    if "steps" in obj:
        return _structured(obj, encoder, template, toks)
    if "input" in obj and "label" in obj:
        return _math_shepherd(obj, encoder, toks, step_tag)
    raise Malformed("missing_key", "needs 'question' + 'steps' + 'labels', or Math-Shepherd 'input' + 'label'")
