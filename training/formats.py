"""Row formats: what fields each needs, and how a row becomes text or chat messages."""

from __future__ import annotations

from typing import Any

from training.errors import UserError

FORMAT_FIELDS = {
    "text": "a 'text' string (or data.text_field)",
    "alpaca": "'instruction' and 'output' strings, optional 'input'",
    "messages": "'messages': a list of {role, content} with at least one assistant turn",
    "preference": "'prompt', 'chosen' and 'rejected' (strings or message lists), or 'chosen' and 'rejected' "
    "as whole conversations that share their prompt turns",
    "prompt": "a 'prompt' string or message list",
}
ROLES = {"system", "user", "assistant", "tool"}


def _fail(where: str, fmt: str, problem: str) -> UserError:
    return UserError(f"{where}: {problem} (format '{fmt}' needs {FORMAT_FIELDS[fmt]})")


def _string(row: dict, key: str, where: str, fmt: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise _fail(where, fmt, f"row is missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise _fail(where, fmt, f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, key: str, where: str, fmt: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _fail(where, fmt, f"field '{key}' must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _fail(where, fmt, f"{key}[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise _fail(where, fmt, f"{key}[{i}] has role '{message['role']}'; roles are {sorted(ROLES)}")
        if not isinstance(message["content"], str):
            raise _fail(where, fmt, f"{key}[{i}].content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _side(row: dict, key: str, where: str, fmt: str) -> str | list[dict]:
    value = row.get(key)
    if value is None:
        raise _fail(where, fmt, f"row is missing field '{key}'")
    if isinstance(value, str):
        if not value.strip():
            raise _fail(where, fmt, f"field '{key}' is empty")
        return value
    return _messages(value, key, where, fmt)


def _split_implicit_prompt(row: dict, where: str, fmt: str) -> dict:
    """Whole chosen/rejected conversations -> the shared prompt turns and the two final answers."""
    chosen = _messages(row["chosen"], "chosen", where, fmt)
    rejected = _messages(row["rejected"], "rejected", where, fmt)
    if chosen[:-1] != rejected[:-1]:
        raise _fail(
            where, fmt, "the prompt turns of 'chosen' and 'rejected' differ; a pair must answer the same prompt"
        )
    if len(chosen) < 2 or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise _fail(where, fmt, "each conversation must be prompt turns followed by one assistant answer")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def normalize_row(row: Any, fmt: str, where: str, text_field: str = "text") -> dict:
    """Check a raw row against its format and return it in the canonical shape for that format.

    text -> {"text"}; alpaca and messages -> {"messages"}; preference -> {"prompt", "chosen", "rejected"};
    prompt -> {"prompt"}. Raises UserError naming `where` (file:line), the field and the format.
    """
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if fmt == "text":
        return {"text": _string(row, text_field, where, fmt)}
    if fmt == "alpaca":
        instruction = _string(row, "instruction", where, fmt)
        extra = _string(row, "input", where, fmt, required=False)
        output = _string(row, "output", where, fmt)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]}
    if fmt == "messages":
        messages = _messages(row.get("messages"), "messages", where, fmt)
        if not any(m["role"] == "assistant" for m in messages):
            raise _fail(where, fmt, "'messages' has no assistant turn to learn from")
        return {"messages": messages}
    if fmt == "preference":
        if "prompt" not in row and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
            row = _split_implicit_prompt(row, where, fmt)
        sides = {key: _side(row, key, where, fmt) for key in ("prompt", "chosen", "rejected")}
        if sides["chosen"] == sides["rejected"]:
            raise _fail(where, fmt, "'chosen' and 'rejected' are identical, so the pair teaches nothing")
        return sides
    if fmt == "prompt":
        return {"prompt": _side(row, "prompt", where, fmt)}
    raise UserError(f"unknown data format '{fmt}'; formats are {sorted(FORMAT_FIELDS)}")
