"""Record schemas -> validated conversations (lists of {"role", "content"} messages), or Malformed.

A valid conversation is an optional system message, then user and assistant messages alternating,
starting with user; every content is a non-empty string (a system text may be empty). SFT
conversations end with an assistant message; preference prompts end with a user message.

Schemas (one JSON object per record):
- alpaca: `instruction`, `output`, optional `input` (joined to the instruction by the template's
  `input_join`), optional `history` [[user, assistant], ...] before it, optional `system`.
- sharegpt: `conversations` [{"from": human|user|gpt|assistant|system, "value": str}] or the OpenAI
  form `messages` [{"role": user|assistant|system, "content": str}], optional top-level `system`.
- pairwise: `prompt` (a string, or messages ending with a user turn), `chosen` and `rejected` (a
  string, or assistant messages continuing the prompt, or whole conversations starting with it),
  optional `system`.
"""

from __future__ import annotations

from typing import Any

from graphllm.data.records import Malformed

__all__ = ["alpaca_messages", "check_conversation", "pairwise_messages", "prompt_messages", "sharegpt_messages", "string_field"]

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def string_field(obj: dict, key: str, *, optional: bool = False, allow_empty: bool = False) -> str | None:
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return None
        raise Malformed("missing_key", f"missing key {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise Malformed("not_string", f"{key!r} is {type(value).__name__}, not a string")
    if not allow_empty and not value.strip():
        raise Malformed("empty_text", f"{key!r} is empty")
    return value


def _with_system(obj: dict, messages: list[dict]) -> list[dict]:
    system = string_field(obj, "system", optional=True, allow_empty=True)
    if system is None or not system.strip():
        return messages
    if messages and messages[0]["role"] == "system":
        raise Malformed("not_alternating", "a top-level 'system' and a system message in the conversation")
    return [{"role": "system", "content": system}, *messages]


def check_conversation(messages: list[dict], *, last: str) -> list[dict]:
    """`messages` if it alternates user/assistant after an optional system message and ends with `last`."""
    if not messages or (len(messages) == 1 and messages[0]["role"] == "system"):
        raise Malformed("empty_conversation", "the conversation has no user or assistant turns")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            n = i + (len(messages) - len(body)) + 1
            raise Malformed("not_alternating", f"message {n} is from {m['role']}, expected {want} "
                                               "(after an optional system message, turns alternate user/assistant)")
        if not m["content"].strip():
            raise Malformed("empty_text", f"message {i + len(messages) - len(body) + 1} ({m['role']}) is empty")
    if body[-1]["role"] != last:
        raise Malformed("not_alternating", f"the conversation ends with a {body[-1]['role']} turn, expected {last}")
    return messages


def alpaca_messages(obj: dict, input_join: str) -> list[dict]:
    instruction = string_field(obj, "instruction")
    extra = string_field(obj, "input", optional=True, allow_empty=True)
    output = string_field(obj, "output")
    messages: list[dict] = []
    history = obj.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise Malformed("wrong_type", f"'history' is {type(history).__name__}, not a list of [user, assistant] pairs")
        for k, pair in enumerate(history):
            if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise Malformed("wrong_type", f"history[{k}] is not a [user, assistant] pair of strings")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = instruction + input_join + extra if extra and extra.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return check_conversation(_with_system(obj, messages), last="assistant")


def _message_list(value: Any, key: str) -> list[dict]:
    """Messages from ShareGPT ({from, value}) or OpenAI ({role, content}) dicts, roles normalised."""
    if not isinstance(value, list):
        raise Malformed("wrong_type", f"{key!r} is {type(value).__name__}, not a list of messages")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise Malformed("wrong_type", f"{key}[{k}] is {type(m).__name__}, not a message object")
        role_key, text_key = ("from", "value") if "from" in m else ("role", "content")
        if role_key not in m or text_key not in m:
            raise Malformed("missing_key", f"{key}[{k}] needs 'from'/'value' or 'role'/'content'")
        role, text = m[role_key], m[text_key]
        if role not in ROLES:
            raise Malformed("unknown_role", f"{key}[{k}] has role {role!r}; known roles: {', '.join(ROLES)}")
        if not isinstance(text, str):
            raise Malformed("not_string", f"{key}[{k}].{text_key} is {type(text).__name__}, not a string")
        out.append({"role": ROLES[role], "content": text})
    return out


def sharegpt_messages(obj: dict) -> list[dict]:
    key = "conversations" if "conversations" in obj else "messages"
    if key not in obj:
        raise Malformed("missing_key", "missing key 'conversations' (or 'messages')")
    return check_conversation(_with_system(obj, _message_list(obj[key], key)), last="assistant")


def _response(obj: dict, key: str, prompt: list[dict]) -> list[dict]:
    """The prompt plus the `key` response: a string, assistant messages, or a whole conversation."""
    if key not in obj:
        raise Malformed("missing_key", f"missing key {key!r}")
    if isinstance(obj[key], str):
        return [*prompt, {"role": "assistant", "content": string_field(obj, key)}]
    messages = _message_list(obj[key], key)
    if messages and messages[0]["role"] != "assistant":  # a whole conversation: must start with the prompt
        convo = messages[1:] if messages[0]["role"] == "system" else messages
        body = prompt[1:] if prompt[0]["role"] == "system" else prompt
        if convo[:len(body)] != body:
            raise Malformed("prompt_mismatch", f"{key!r} is a whole conversation that does not start with the prompt")
        messages = convo[len(body):]
    return check_conversation([*prompt, *messages], last="assistant")


def prompt_messages(obj: dict, key: str = "prompt") -> list[dict]:
    """A prompt: the `key` string as one user turn, or messages ending with a user turn; plus `system`."""
    if key not in obj:
        raise Malformed("missing_key", f"missing key {key!r}")
    if isinstance(obj[key], str):
        prompt = [{"role": "user", "content": string_field(obj, key)}]
    else:
        prompt = _message_list(obj[key], key)
    return check_conversation(_with_system(obj, prompt), last="user")


def pairwise_messages(obj: dict) -> tuple[list[dict], list[dict], int]:
    """(chosen conversation, rejected conversation, number of prompt messages) of a preference record."""
    prompt = prompt_messages(obj)
    return _response(obj, "chosen", prompt), _response(obj, "rejected", prompt), len(prompt)
