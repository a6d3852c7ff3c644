"""Datasets as LLaMA-Factory and Axolotl describe them: a dataset_info.json entry by name, or an Axolotl `datasets:`
entry. Each becomes the file to read and a conversion of its rows into one of tuneyard's formats, so the rows are then
checked and trained like any other."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tuneyard.training.config import DataSource
from tuneyard.training.data.formats import DEFAULT_SPEAKERS, Speakers, speakers_from_tags
from tuneyard.training.data.registry_entries import (
    AXOLOTL_ROLES,
    AXOLOTL_TYPES,
    CHAT_KIND,
    LlamaFactoryEntry,
    llamafactory_entry,
)
from tuneyard.training.errors import UserError

# --- turning a registry's rows into tuneyard's --------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryRows:
    """How to read one registry entry: the source to read, the format its converted rows are in, and the conversion."""

    source: DataSource  # the file or hub dataset the entry points at
    fmt: str  # the tuneyard format `convert` returns rows of
    convert: Callable[[dict, str], dict]  # (raw row, where) -> a row of `fmt`
    described: str  # what the conversion depends on, for the tokenised cache's key
    what: str  # the entry, for messages
    speakers: Speakers = DEFAULT_SPEAKERS
    extra: dict = field(default_factory=dict)  # keys every canonical row gets (train_on_eos)


def _value(row: dict, column: str, setting: str, what: str, where: str) -> Any:
    """A column the entry names; missing, it is an error naming the column and the setting that names it."""
    if row.get(column) is None:
        have = ", ".join(f"'{c}'" for c in row) or "none"
        raise UserError(
            f"{where}: row has no column '{column}' ({what}: {setting}); its columns are {have}. Fix the entry's "
            f"{setting}"
        )
    return row[column]


def _llamafactory_alpaca(entry: LlamaFactoryEntry, row: dict, where: str) -> tuple[list[dict], dict]:
    """The prompt turns of an alpaca row as LLaMA-Factory builds them (history, then instruction\\ninput), and the
    row keys every format shares (system, tools)."""
    turns: list[dict] = []
    history = entry.column("history")
    if history and isinstance(row.get(history), list):
        for i, pair in enumerate(row[history]):
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise UserError(f"{where}: {history}[{i}] must be a [question, answer] pair ({entry.where}: history)")
            turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = [row[c] for c in (entry.column("prompt"), entry.column("query")) if c and row.get(c)]
    if not query:
        raise UserError(
            f"{where}: the row has no text in column '{entry.column('prompt')}' ({entry.where}: columns.prompt)"
        )
    turns.append({"role": "user", "content": "\n".join(str(q) for q in query)})
    return turns, _shared(entry, row)


def _shared(entry: LlamaFactoryEntry, row: dict) -> dict:
    shared = {}
    for key in ("system", "tools"):
        column = entry.column(key)
        if column and row.get(column) not in (None, ""):
            shared[key] = row[column]
    return shared


def llamafactory_rows(source: DataSource) -> RegistryRows:
    """The entry `source.name` of the dataset_info.json at `source.path`, read as LLaMA-Factory reads it."""
    entry = llamafactory_entry(source.path, str(source.name))
    kto, ranking = entry.column("kto_tag"), entry.ranking
    fmt = "unpaired_preference" if kto else "preference" if ranking else "messages"
    if entry.formatting == "sharegpt" and not kto and not ranking:
        fmt = "sharegpt"

    def answer(row: dict, key: str, where: str) -> Any:
        column = entry.column(key)
        return _value(row, str(column), f"columns.{key}", entry.where, where)

    def convert(row: dict, where: str) -> dict:
        if not isinstance(row, dict):
            raise UserError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        if entry.formatting == "sharegpt":
            out = {"conversations": answer(row, "messages", where), **_shared(entry, row)}
        else:
            prompt, shared = _llamafactory_alpaca(entry, row, where)
            out = {"prompt": prompt, **shared}
        if (kto or ranking) and "tools" in out:
            raise UserError(
                f"{where}: the preference stages do not read tool definitions; remove columns.tools from {entry.where}"
            )
        if kto:
            out["label"] = answer(row, "kto_tag", where)
            if entry.formatting == "alpaca":
                out["completion"] = [{"role": "assistant", "content": answer(row, "response", where)}]
        elif ranking:
            out.update(chosen=answer(row, "chosen", where), rejected=answer(row, "rejected", where))
        elif entry.formatting == "alpaca":
            system = [{"role": "system", "content": out.pop("system")}] if "system" in out else []
            response = {"role": "assistant", "content": answer(row, "response", where)}
            out = {"messages": [*system, *out.pop("prompt"), response], **out}
        return out

    read = DataSource(path=entry.file, split=entry.split, name=entry.subset if entry.hub else None)
    described = json.dumps([entry.formatting, entry.ranking, entry.columns, entry.tags, entry.split, entry.subset])
    return RegistryRows(read, fmt, convert, described, entry.where, speakers_from_tags(entry.tags))


def _axolotl_turns(value: Any, source: DataSource, column: str, where: str, roles_to_train: bool = False) -> Any:
    """Axolotl messages -> {role, content} turns: properties renamed, roles mapped, training flags as loss_weight."""
    if not isinstance(value, list | dict):
        return value  # a string prompt or answer: the format's own check reads it
    mapping = {"role": "role", "content": "content", **(source.message_property_mappings or {})}
    if source.roles:
        names = {name: target for target, names in source.roles.items() for name in names}
    else:
        names = AXOLOTL_ROLES
    trained = {names.get(role, role) for role in source.roles_to_train or []}

    def turn(message: Any, name: str) -> Any:
        if not isinstance(message, dict):
            return message
        role = message.get(mapping["role"])
        out = {
            **{k: message[k] for k in ("tool_calls", "name", "tool_call_id") if message.get(k) is not None},
            "role": names.get(role, role),
            "content": message.get(mapping["content"]),
        }
        flag = message.get(source.message_field_training) if source.message_field_training else None
        if flag is not None:
            if not isinstance(flag, bool):
                raise UserError(
                    f"{where}: {name}.{source.message_field_training} must be true or false (the entry's "
                    "message_field_training)"
                )
            out["loss_weight"] = int(flag)
        elif roles_to_train and source.roles_to_train is not None:
            out["loss_weight"] = int(out["role"] in trained)
        return out

    if isinstance(value, dict):
        return turn(value, column)
    return [turn(message, f"{column}[{i}]") for i, message in enumerate(value)]


def axolotl_rows(source: DataSource) -> RegistryRows:
    """An Axolotl `datasets:` entry read as Axolotl reads its type."""
    kind = str(source.type)
    fmt = AXOLOTL_TYPES[kind][0]
    what = f"the Axolotl entry for {source.path} (type {kind})"
    messages_field = source.field_messages or "messages"

    def convert(row: dict, where: str) -> dict:
        if not isinstance(row, dict):
            raise UserError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        if kind == "alpaca":  # Axolotl's alpaca reads these three columns, no system or history
            for key in ("instruction", "output"):
                _value(row, key, "type alpaca", what, where)
            return {key: row[key] for key in ("instruction", "input", "output") if key in row}
        if kind == "chat_template.argilla_chat":
            return {key: _axolotl_turns(row.get(key), source, key, where) for key in ("chosen", "rejected")}
        messages = _value(row, messages_field, "field_messages", what, where)
        if kind == "chat_template.default":
            chosen, rejected = source.field_chosen or "chosen", source.field_rejected or "rejected"
            answers = {
                side: _axolotl_turns(_value(row, column, f"field_{side}", what, where), source, column, where)
                for side, column in (("chosen", chosen), ("rejected", rejected))
            }
            if isinstance(messages, str):
                messages = [{"role": "user", "content": messages}]
            # a list answer stands for its last message, as Axolotl reads it
            answers = {side: a[-1:] if isinstance(a, list) else a for side, a in answers.items()}
            return {"prompt": _axolotl_turns(messages, source, messages_field, where), **answers}
        turns = _axolotl_turns(messages, source, messages_field, where, roles_to_train=True)
        system = row.get(source.field_system or "system")
        if isinstance(turns, list) and isinstance(system, str) and system:
            if not (turns and isinstance(turns[0], dict) and turns[0].get("role") == "system"):
                turns = [{"role": "system", "content": system}, *turns]
        tools = row.get(source.field_tools or "tools")
        return {"messages": turns, **({"tools": tools} if tools is not None else {})}

    eos = source.train_on_eos or "turn"
    extra = {"train_on_eos": eos} if eos != "turn" else {}
    read = DataSource(path=source.path, split=source.split, name=source.name)
    described = source.model_dump_json(exclude={"weight"})
    return RegistryRows(read, fmt, convert, described, what, extra=extra)


def registry_rows(source: DataSource) -> RegistryRows | None:
    """How to read `source` when it is an LLaMA-Factory or Axolotl entry; None for a plain file or hub dataset."""
    if source.dataset_info is not None:
        return llamafactory_rows(source)
    if source.type is not None:
        return axolotl_rows(source)
    return None


def check_fits(registry: RegistryRows, data_format: str, key: str) -> None:
    """The entry's rows are what data.format says (pairs also feed KTO, which takes each answer apart)."""
    fits = (
        registry.fmt == data_format
        or (registry.fmt in CHAT_KIND and data_format in CHAT_KIND)
        or (registry.fmt == "preference" and data_format == "unpaired_preference")
    )
    if fits:
        return
    wanted = "messages (or alpaca, sharegpt)" if registry.fmt in CHAT_KIND else registry.fmt
    kinds = {"preference": "preference pairs", "unpaired_preference": "feedback rows (one answer and a label)"}
    raise UserError(
        f"{key}: {registry.what} holds {kinds.get(registry.fmt, 'conversations')}, but data.format is "
        f"'{data_format}'; set data.format: {wanted} (and a stage that reads it)"
    )
