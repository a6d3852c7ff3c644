"""Row formats: what fields each needs, and how a row becomes text or chat messages."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tuneyard.training.errors import UserError

FORMAT_FIELDS = {
    "text": "a 'text' string (or data.text_field)",
    "alpaca": "'instruction' and 'output' strings, optional 'input', 'system', 'history' ([[question, answer], ...])",
    "sharegpt": "'conversations': a list of {from: human|gpt|system|tool, value} with at least one gpt turn, "
    "optional 'system' and 'tools'",
    "messages": "'messages': a list of {role, content} with at least one assistant turn, optional 'tools'",
    "preference": "'prompt' (or ShareGPT's 'conversations'), 'chosen' and 'rejected' (strings, one message or "
    "message lists), or 'chosen' and 'rejected' as whole conversations that share their prompt turns; optional "
    "'system'",
    "unpaired_preference": "'prompt' and 'completion' (strings or message lists), or 'messages' (or 'conversations') "
    "whose last turn is the completion; and 'label': true for a desirable completion, false for an undesirable one",
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
# the keys of a message read besides role and content (loss_weight by the loss mask); anything else is refused
MESSAGE_EXTRAS = ("tool_calls", "name", "tool_call_id", "loss_weight")
# LLaMA-Factory's tags that name a speaker, and the role each one stands for
TAG_ROLES = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "assistant",
    "system_tag": "system",
}
CONVERSATION_FIELDS = ("conversations", "messages")  # a whole conversation in preference and feedback rows


@dataclass(frozen=True)
class Speakers:
    """How ShareGPT-style turns name their keys and speakers (LLaMA-Factory's `tags`, tuneyard's data.tags)."""

    role_tag: str = "from"
    content_tag: str = "value"
    roles: Mapping[str, str] = field(default_factory=lambda: dict(SHAREGPT_ROLES))  # speaker -> role
    calls: frozenset[str] = frozenset({"function_call"})  # speakers whose value is a tool call as JSON
    renamed: bool = False  # set by tags: then even {role, content} messages name their speakers by the tags


def speakers_from_tags(tags: Mapping[str, str | None] | None) -> Speakers:
    """The Speakers LLaMA-Factory's tags describe; a tag left out keeps its default, the usual names stay known."""
    given = {key: value for key, value in (tags or {}).items() if value is not None}
    if not given:
        return Speakers()
    roles = dict(SHAREGPT_ROLES)
    roles.update({given[key]: role for key, role in TAG_ROLES.items() if key in given})
    calls = frozenset({"function_call", given.get("function_tag", "function_call")})
    return Speakers(given.get("role_tag", "from"), given.get("content_tag", "value"), roles, calls, renamed=True)


DEFAULT_SPEAKERS = Speakers()


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
    """Content parts [{type: text, text}, ...] (OpenAI; LLaMA-Factory writes `value`) -> their text; other kinds
    are refused, not dropped."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("text", part.get("value")) if isinstance(part, dict) else None
        if kind != "text" or not isinstance(text, str):
            raise _fail(
                where,
                fmt,
                f"{name}[{j}] is a '{kind or type(part).__name__}' content part; tuneyard trains on text, so only "
                "{type: text, text: ...} (or value: ...) parts are read: drop the other parts or the row",
            )
        texts.append(text)
    return "\n".join(texts)


def _loss_weight(value: Any, name: str, where: str, fmt: str) -> int:
    """A turn's loss_weight: 1 puts loss on the turn, 0 none; other weights are refused rather than rounded."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value not in (0, 1):
        raise _fail(
            where,
            fmt,
            f"{name}.loss_weight is {value!r}; it must be 0 (no loss on the turn) or 1 (loss on it): tuneyard masks "
            "turns, it does not weigh them",
        )
    return int(value)


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


def _is_turn(message: Any, speakers: Speakers) -> bool:
    """Whether a message is a ShareGPT-style turn ({from, value}, or the keys data.tags names) to read by speaker."""
    if not isinstance(message, dict):
        return False
    if speakers.role_tag == "role":
        return speakers.renamed
    return speakers.role_tag in message and "role" not in message


def _message(message: Any, name: str, where: str, fmt: str, speakers: Speakers = DEFAULT_SPEAKERS) -> dict:
    """One {role, content} turn, with tool calls, content parts and null content kept or refused, never dropped."""
    if _is_turn(message, speakers):
        return _sharegpt_turn(message, name, where, fmt, speakers)
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise _fail(
            where,
            fmt,
            f"{name} must be an object with 'role' and 'content' (or ShareGPT's '{speakers.role_tag}' and "
            f"'{speakers.content_tag}')",
        )
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
    if message.get("loss_weight") is not None:
        out["loss_weight"] = _loss_weight(message["loss_weight"], name, where, fmt)
    return out


def _messages(value: Any, key: str, where: str, fmt: str, speakers: Speakers = DEFAULT_SPEAKERS) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _fail(where, fmt, f"field '{key}' must be a non-empty list of messages")
    return [_message(message, f"{key}[{i}]", where, fmt, speakers) for i, message in enumerate(value)]


def _unweighted(messages: list[dict]) -> list[dict]:
    """Turns without their loss_weight: the preference stages put their loss on the answers, whatever it says."""
    return [{k: v for k, v in m.items() if k != "loss_weight"} for m in messages]


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


def _sharegpt_turn(turn: Any, name: str, where: str, fmt: str, speakers: Speakers = DEFAULT_SPEAKERS) -> dict:
    """{from, value} (or the keys data.tags names) -> {role, content}; a function_call turn's JSON value becomes
    the turn's tool_calls. Keys besides speaker and text are ignored, as ShareGPT readers do, except the ones a
    message carries (tool_calls, name, tool_call_id, loss_weight)."""
    if not isinstance(turn, dict):
        raise _fail(where, fmt, f"{name} must be an object with '{speakers.role_tag}' and '{speakers.content_tag}'")
    speaker = turn.get(speakers.role_tag, turn.get("role"))
    value = turn.get(speakers.content_tag, turn.get("content"))
    if speaker not in speakers.roles:
        rename = "" if speakers.renamed else "; name yours with data.tags (user_tag, assistant_tag, ...)"
        raise _fail(where, fmt, f"{name} is from '{speaker}'; speakers are {sorted(speakers.roles)}{rename}")
    kept = {key: turn[key] for key in MESSAGE_EXTRAS if turn.get(key) is not None}
    if speaker in speakers.calls:
        try:
            call = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError:
            raise _fail(where, fmt, f"{name} is a function_call whose value is not JSON {{name, arguments}}") from None
        calls = call if isinstance(call, list) else [call]
        return _message({**kept, "role": "assistant", "content": None, "tool_calls": calls}, name, where, fmt)
    return _message({**kept, "role": speakers.roles[speaker], "content": value}, name, where, fmt)


def _chat(messages: list[dict], tools: list[dict] | None, where: str, fmt: str) -> dict:
    """The canonical chat row; a conversation without an assistant turn, or loss on none of its turns, has nothing
    to learn."""
    if not any(m["role"] == "assistant" for m in messages):
        raise _fail(where, fmt, "the conversation has no assistant turn to learn from")
    if all(m.get("loss_weight") == 0 for m in messages):
        raise _fail(
            where, fmt, "every turn has loss_weight 0, so nothing is learned; set loss_weight 1 on the turns to learn"
        )
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


def _sharegpt(row: dict, where: str, fmt: str, speakers: Speakers) -> dict:
    """conversations of {from, value} -> messages, with a row-level system prompt and tools honoured."""
    turns = row.get("conversations")
    if turns is None:
        raise _missing(row, "conversations", where, fmt)
    if not isinstance(turns, list) or not turns:
        raise _fail(where, fmt, "field 'conversations' must be a non-empty list of {from, value} turns")
    messages = [_sharegpt_turn(turn, f"conversations[{i}]", where, fmt, speakers) for i, turn in enumerate(turns)]
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


def _side(row: dict, key: str, where: str, fmt: str, speakers: Speakers = DEFAULT_SPEAKERS) -> str | list[dict]:
    """A prompt or an answer: a string, or its messages without loss_weight (an answer's may not be 0)."""
    value = row.get(key)
    if value is None:
        raise _missing(row, key, where, fmt)
    if isinstance(value, str):
        if not value.strip():
            raise _fail(where, fmt, f"field '{key}' is empty")
        return value
    if isinstance(value, dict):  # one message, as LLaMA-Factory's and Axolotl's pairs give their answers
        message = _message(value, key, where, fmt, speakers)
        if key != "prompt" and message["role"] != "assistant":
            raise _fail(where, fmt, f"'{key}' is a '{message['role']}' turn; an answer is an assistant turn")
        value = [message]
    messages = _messages(value, key, where, fmt, speakers)
    if key != "prompt" and any(m.get("loss_weight") == 0 for m in messages):
        raise _fail(
            where,
            fmt,
            f"'{key}' has a turn with loss_weight 0, but a preference loss is measured on the answers; set it to 1 "
            "(or leave it out)",
        )
    return _unweighted(messages)


def _with_system(row: dict, where: str, fmt: str) -> dict:
    """A row-level 'system' prompt put before the prompt turns (a string prompt becomes its user turn)."""
    system = _string(row, "system", where, fmt, required=False)
    prompt = row.get("prompt")
    if not system or prompt is None:
        return row
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and turns[0].get("role") == "system":
        return row
    return {**row, "prompt": [{"role": "system", "content": system}, *turns]}


def _conversation(row: dict, where: str, fmt: str, speakers: Speakers) -> tuple[str, list[dict]] | None:
    """A preference or feedback row's whole conversation ('conversations' or 'messages') and its field name."""
    key = next((k for k in CONVERSATION_FIELDS if row.get(k) is not None), None)
    return (key, _messages(row[key], key, where, fmt, speakers)) if key else None


def _preference(row: dict, where: str, fmt: str, speakers: Speakers) -> dict:
    """A pair: prompt (or a ShareGPT conversation) and two answers, or two whole conversations."""
    if "prompt" not in row:
        conversation = _conversation(row, where, fmt, speakers)
        if conversation is not None:
            row = {**row, "prompt": conversation[1]}
        elif isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
            row = {**row, **_split_implicit_prompt(row, where, fmt, speakers)}
    row = _with_system(row, where, fmt)
    sides = {key: _side(row, key, where, fmt, speakers) for key in ("prompt", "chosen", "rejected")}
    if sides["chosen"] == sides["rejected"]:
        raise _fail(where, fmt, "'chosen' and 'rejected' are identical, so the pair teaches nothing")
    return sides


def _unpaired(row: dict, where: str, fmt: str, speakers: Speakers = DEFAULT_SPEAKERS) -> dict:
    """One completion judged on its own: desirable (label true) or undesirable (label false), as KTO reads it."""
    if "prompt" not in row and "completion" not in row:
        conversation = _conversation(row, where, fmt, speakers)
        if conversation is not None:
            key, turns = conversation
            if len(turns) < 2 or turns[-1]["role"] != "assistant":
                raise _fail(
                    where,
                    fmt,
                    f"field '{key}' must be prompt turns followed by the assistant answer that 'label' judges",
                )
            row = {**row, "prompt": turns[:-1], "completion": turns[-1:]}
    row = _with_system(row, where, fmt)
    sides = {key: _side(row, key, where, fmt, speakers) for key in ("prompt", "completion")}
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


def _split_implicit_prompt(row: dict, where: str, fmt: str, speakers: Speakers = DEFAULT_SPEAKERS) -> dict:
    """Whole chosen/rejected conversations -> the shared prompt turns and the two final answers."""
    chosen = _messages(row["chosen"], "chosen", where, fmt, speakers)
    rejected = _messages(row["rejected"], "rejected", where, fmt, speakers)
    if _unweighted(chosen[:-1]) != _unweighted(rejected[:-1]):
        raise _fail(
            where, fmt, "the prompt turns of 'chosen' and 'rejected' differ; a pair must answer the same prompt"
        )
    if len(chosen) < 2 or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise _fail(where, fmt, "each conversation must be prompt turns followed by one assistant answer")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def normalize_row(
    row: Any,
    fmt: str,
    where: str,
    text_field: str = "text",
    columns: dict[str, str] | None = None,
    speakers: Speakers = DEFAULT_SPEAKERS,
) -> dict:
    """Check a raw row against its format and return it in the canonical shape for that format.

    text -> {"text"}; alpaca, sharegpt and messages -> {"messages"} (and "tools" when the row defines them; a turn
    keeps its loss_weight); preference -> {"prompt", "chosen", "rejected"}; unpaired_preference -> {"prompt",
    "completion", "label"}; prompt -> {"prompt"}; classification -> {"text", "label"}; bio -> {"tokens", "tags"}.
    `columns` first renames the file's columns to the format's fields; `speakers` reads ShareGPT-style turns (tags).
    Raises UserError naming `where` (file:line), the field and the format.
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
        return _sharegpt(row, where, fmt, speakers)
    if fmt == "messages":
        if row.get("messages") is None:
            raise _missing(row, "messages", where, fmt)
        messages = _messages(row["messages"], "messages", where, fmt, speakers)
        return _chat(messages, _tools(row, where, fmt), where, fmt)
    if fmt == "preference":
        return _preference(row, where, fmt, speakers)
    if fmt == "unpaired_preference":
        return _unpaired(row, where, fmt, speakers)
    if fmt == "prompt":
        return {"prompt": _side(row, "prompt", where, fmt, speakers)}
    if fmt == "classification":
        return _classified(row, where, fmt, text_field)
    if fmt == "bio":
        return _bio_tagged(row, where, fmt)
    raise UserError(f"unknown data format '{fmt}'; formats are {sorted(FORMAT_FIELDS)}")
