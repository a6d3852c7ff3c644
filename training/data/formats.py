"""Row formats: what fields each needs, and how a row becomes text or chat messages."""

from __future__ import annotations

import json
import re
from typing import Any

from tuneyard.training.errors import UserError

FORMAT_FIELDS = {
    "text": "a 'text' string (or data.text_field)",
    "alpaca": "'instruction' and 'output' strings, optional 'input', 'system', 'history' ([[question, answer], ...])",
    "sharegpt": "'conversations': a list of {from: human|gpt|system|tool, value} with at least one gpt turn, "
    "optional 'system' and 'tools'",
    "messages": "'messages': a list of {role, content} with at least one assistant turn, optional 'tools'",
    "preference": "'prompt', 'chosen' and 'rejected' (strings or message lists), or 'chosen' and 'rejected' "
    "as whole conversations that share their prompt turns",
    "unpaired_preference": "'prompt' and 'completion' (strings or message lists) and 'label': true for a "
    "desirable completion, false for an undesirable one",
    "prompt": "a 'prompt' string or message list",
    "classification": "a 'text' string (or data.text_field) and a 'label': a class name or an integer class id",
    "bio": "'tokens' (a list of words) and 'tags' (one BIO tag per word: O, B-TYPE or I-TYPE, e.g. B-PER)",
}
# one word's tag in BIO notation: outside, or the beginning / inside of an entity of a named type
BIO_TAG = re.compile(r"^(O|[BI]-[^\s-][^\s]*)$")
ROLES = {"system", "user", "assistant", "tool"}
# ShareGPT speakers as Axolotl, LLaMA-Factory and FastChat write them
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
    "function_call": "assistant",  # its value is the call as JSON: kept as the turn's tool_calls
}
# the keys of a message the chat templates read besides role and content; anything else is refused
MESSAGE_EXTRAS = ("tool_calls", "name", "tool_call_id")


def _fail(where: str, fmt: str, problem: str) -> UserError:
    return UserError(f"{where}: {problem} (format '{fmt}' needs {FORMAT_FIELDS[fmt]})")


def _missing(row: dict, key: str, where: str, fmt: str) -> UserError:
    """A missing field, with the columns the row does have and how to map one of them."""
    columns = ", ".join(f"'{c}'" for c in row) or "none"
    return _fail(
        where,
        fmt,
        f"row is missing field '{key}'; its columns are {columns}. If one of them holds it, map it with "
        f"data.columns: {{{key}: <that column>}}",
    )


def _string(row: dict, key: str, where: str, fmt: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise _missing(row, key, where, fmt)
        return ""
    if not isinstance(value, str):
        raise _fail(where, fmt, f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _text_of_parts(parts: list, name: str, where: str, fmt: str) -> str:
    """OpenAI-style content parts [{type: text, text}, ...] -> their text; other kinds are refused, not dropped."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise _fail(
                where,
                fmt,
                f"{name}[{j}] is a '{kind or type(part).__name__}' content part; tuneyard trains on text, so only "
                "{type: text, text: ...} parts are read: drop the other parts or the row",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_calls(value: Any, name: str, where: str, fmt: str) -> list[dict]:
    """Check tool calls are [{type: function, function: {name, arguments}}, ...] (or bare {name, arguments})."""
    if not isinstance(value, list) or not value:
        raise _fail(where, fmt, f"{name}.tool_calls must be a non-empty list of calls")
    calls = []
    for j, call in enumerate(value):
        # OpenAI nests {name, arguments} under "function"; some datasets give the bare {name, arguments}
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _fail(where, fmt, f"{name}.tool_calls[{j}] must be {{type: function, function: {{name, arguments}}}}")
        arguments = function.get("arguments")
        if isinstance(arguments, str):  # OpenAI's JSON string; transformers' templates expect the object
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise _fail(where, fmt, f"{name}.tool_calls[{j}].function.arguments is a string but not JSON") from None
        normalized = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        calls.append({**normalized, "id": str(call["id"])} if call.get("id") is not None else normalized)
    return calls


def _message(message: Any, name: str, where: str, fmt: str) -> dict:
    """One {role, content} turn, with tool calls, content parts and null content kept or refused, never dropped."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise _fail(where, fmt, f"{name} must be an object with 'role' and 'content'")
    if message["role"] not in ROLES:
        raise _fail(where, fmt, f"{name} has role '{message['role']}'; roles are {sorted(ROLES)}")
    # a key that is null is no content (Arrow and Parquet give every row the union of the rows' keys)
    unknown = sorted(k for k in set(message) - {"role", "content", *MESSAGE_EXTRAS} if message[k] is not None)
    if unknown:
        raise _fail(
            where,
            fmt,
            f"{name} has keys {unknown} that no chat template reads; keys are role, content, "
            f"{', '.join(MESSAGE_EXTRAS)}: remove them or fold them into the content",
        )
    out = {"role": message["role"]}
    content = message["content"]
    if message.get("tool_calls") is not None:
        if message["role"] != "assistant":
            raise _fail(
                where, fmt, f"{name} has tool_calls but role '{message['role']}'; only assistant turns call tools"
            )
        out["tool_calls"] = _tool_calls(message["tool_calls"], name, where, fmt)
    if isinstance(content, list):
        content = _text_of_parts(content, f"{name}.content", where, fmt)
    elif content is None:
        if "tool_calls" not in out:
            raise _fail(
                where,
                fmt,
                f"{name}.content is null and the turn calls no tool, so it says nothing; give it text or drop the turn",
            )
        content = ""
    elif not isinstance(content, str):
        raise _fail(where, fmt, f"{name}.content must be a string or a list of text parts")
    out["content"] = content
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            out[key] = str(message[key])
    return out


def _messages(value: Any, key: str, where: str, fmt: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _fail(where, fmt, f"field '{key}' must be a non-empty list of messages")
    return [_message(message, f"{key}[{i}]", where, fmt) for i, message in enumerate(value)]


def _tools(row: dict, where: str, fmt: str) -> list[dict] | None:
    """A row's tool definitions (a list, or a JSON string of one as LLaMA-Factory writes them), or None."""
    tools = row.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise _fail(where, fmt, "field 'tools' is a string but not JSON; give a list of tool definitions") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _fail(where, fmt, "field 'tools' must be a list of tool definitions (JSON objects)")
    return tools


def _sharegpt_turn(turn: Any, name: str, where: str, fmt: str) -> dict:
    """{from, value} -> {role, content}; a function_call turn's JSON value becomes the turn's tool_calls."""
    if not isinstance(turn, dict):
        raise _fail(where, fmt, f"{name} must be an object with 'from' and 'value'")
    speaker, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
    if speaker not in SHAREGPT_ROLES:
        raise _fail(where, fmt, f"{name} is from '{speaker}'; speakers are {sorted(SHAREGPT_ROLES)}")
    if speaker == "function_call":
        try:
            call = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError:
            raise _fail(where, fmt, f"{name} is a function_call whose value is not JSON {{name, arguments}}") from None
        calls = call if isinstance(call, list) else [call]
        return _message({"role": "assistant", "content": None, "tool_calls": calls}, name, where, fmt)
    return _message({"role": SHAREGPT_ROLES[speaker], "content": value}, name, where, fmt)


def _chat(messages: list[dict], tools: list[dict] | None, where: str, fmt: str) -> dict:
    """The canonical chat row; a conversation without an assistant turn has nothing to learn."""
    if not any(m["role"] == "assistant" for m in messages):
        raise _fail(where, fmt, "the conversation has no assistant turn to learn from")
    return {"messages": messages, **({"tools": tools} if tools else {})}


def _alpaca(row: dict, where: str, fmt: str) -> dict:
    """instruction/input/output, with an optional system prompt and earlier [question, answer] turns."""
    instruction = _string(row, "instruction", where, fmt)
    extra = _string(row, "input", where, fmt, required=False)
    output = _string(row, "output", where, fmt)
    system = _string(row, "system", where, fmt, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    history = row.get("history") or []
    if not isinstance(history, list):
        raise _fail(where, fmt, "field 'history' must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise _fail(where, fmt, f"history[{i}] must be a [question, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return {"messages": [*messages, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]}


def _sharegpt(row: dict, where: str, fmt: str) -> dict:
    """conversations of {from, value} -> messages, with a row-level system prompt and tools honoured."""
    turns = row.get("conversations")
    if turns is None:
        raise _missing(row, "conversations", where, fmt)
    if not isinstance(turns, list) or not turns:
        raise _fail(where, fmt, "field 'conversations' must be a non-empty list of {from, value} turns")
    messages = [_sharegpt_turn(turn, f"conversations[{i}]", where, fmt) for i, turn in enumerate(turns)]
    system = _string(row, "system", where, fmt, required=False)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return _chat(messages, _tools(row, where, fmt), where, fmt)


def map_columns(row: dict, columns: dict[str, str], where: str) -> dict:
    """Rename the file's columns to the format's fields (data.columns: {field: column})."""
    missing = [column for column in columns.values() if column not in row]
    if missing:
        have = ", ".join(f"'{c}'" for c in row) or "none"
        raise UserError(
            f"{where}: data.columns names column(s) {', '.join(repr(c) for c in missing)}, which this row does not "
            f"have; its columns are {have}. Fix data.columns ({{field: column of your file}})"
        )
    renamed = {k: v for k, v in row.items() if k not in columns.values()}
    renamed.update({field: row[column] for field, column in columns.items()})
    return renamed


def _side(row: dict, key: str, where: str, fmt: str) -> str | list[dict]:
    value = row.get(key)
    if value is None:
        raise _missing(row, key, where, fmt)
    if isinstance(value, str):
        if not value.strip():
            raise _fail(where, fmt, f"field '{key}' is empty")
        return value
    return _messages(value, key, where, fmt)


def _unpaired(row: dict, where: str, fmt: str) -> dict:
    """One completion judged on its own: desirable (label true) or undesirable (label false), as KTO reads it."""
    sides = {key: _side(row, key, where, fmt) for key in ("prompt", "completion")}
    label = row.get("label")
    if label is None:
        raise _missing(row, "label", where, fmt)
    if not isinstance(label, bool):  # 0/1 or "yes" could mean either way round: ask, do not guess
        raise _fail(
            where,
            fmt,
            f"field 'label' must be true or false (a JSON boolean), got {type(label).__name__} {label!r}; write "
            "true for a desirable completion and false for an undesirable one",
        )
    return {**sides, "label": label}


def _classified(row: dict, where: str, fmt: str, text_field: str) -> dict:
    """A text and its class: a name (string) or a class id (a non-negative integer)."""
    text = _string(row, text_field, where, fmt)
    label = row.get("label")
    if label is None:
        raise _missing(row, "label", where, fmt)
    if isinstance(label, bool) or not isinstance(label, str | int) or (isinstance(label, int) and label < 0):
        raise _fail(where, fmt, f"field 'label' must be a class name or a class id >= 0, got {label!r}")
    if isinstance(label, str) and not label.strip():
        raise _fail(where, fmt, "field 'label' is empty; give the class name")
    return {"text": text, "label": label}


def _bio_tagged(row: dict, where: str, fmt: str) -> dict:
    """Words and one BIO tag per word; a tag outside the scheme, or a count that differs, is refused."""
    tokens, tags = row.get("tokens"), row.get("tags")
    for key, value in (("tokens", tokens), ("tags", tags)):
        if value is None:
            raise _missing(row, key, where, fmt)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise _fail(where, fmt, f"field '{key}' must be a non-empty list of non-empty strings")
    if len(tokens) != len(tags):
        raise _fail(
            where,
            fmt,
            f"'tokens' has {len(tokens)} words but 'tags' has {len(tags)} tags; give exactly one tag per word",
        )
    for i, tag in enumerate(tags):
        if not BIO_TAG.match(tag):
            raise _fail(
                where,
                fmt,
                f"tags[{i}] '{tag}' (for word '{tokens[i]}') is not a BIO tag; write O outside entities, B-TYPE "
                "on an entity's first word and I-TYPE on the words after it (e.g. B-PER I-PER)",
            )
    return {"tokens": tokens, "tags": tags}


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


def normalize_row(
    row: Any, fmt: str, where: str, text_field: str = "text", columns: dict[str, str] | None = None
) -> dict:
    """Check a raw row against its format and return it in the canonical shape for that format.

    text -> {"text"}; alpaca, sharegpt and messages -> {"messages"} (and "tools" when the row defines them);
    preference -> {"prompt", "chosen", "rejected"}; unpaired_preference -> {"prompt", "completion", "label"};
    prompt -> {"prompt"}; classification -> {"text", "label"}; bio -> {"tokens", "tags"}. `columns` first renames
    the file's columns to the format's fields. Raises UserError naming `where` (file:line), the field and the format.
    """
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if columns:
        row = map_columns(row, columns, where)
    if fmt == "text":
        return {"text": _string(row, text_field, where, fmt)}
    if fmt == "alpaca":
        return _alpaca(row, where, fmt)
    if fmt == "sharegpt":
        return _sharegpt(row, where, fmt)
    if fmt == "messages":
        if row.get("messages") is None:
            raise _missing(row, "messages", where, fmt)
        return _chat(_messages(row["messages"], "messages", where, fmt), _tools(row, where, fmt), where, fmt)
    if fmt == "preference":
        if "prompt" not in row and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
            row = _split_implicit_prompt(row, where, fmt)
        sides = {key: _side(row, key, where, fmt) for key in ("prompt", "chosen", "rejected")}
        if sides["chosen"] == sides["rejected"]:
            raise _fail(where, fmt, "'chosen' and 'rejected' are identical, so the pair teaches nothing")
        return sides
    if fmt == "unpaired_preference":
        return _unpaired(row, where, fmt)
    if fmt == "prompt":
        return {"prompt": _side(row, "prompt", where, fmt)}
    if fmt == "classification":
        return _classified(row, where, fmt, text_field)
    if fmt == "bio":
        return _bio_tagged(row, where, fmt)
    raise UserError(f"unknown data format '{fmt}'; formats are {sorted(FORMAT_FIELDS)}")
