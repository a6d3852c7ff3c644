"""LLaMA-Factory's and Axolotl's dataset entries, checked key by key: what a `data.train` item names (a
dataset_info.json entry, or an Axolotl `datasets:` entry with its type) and whether tuneyard reads it.

Kept apart from the conversion of their rows (registries.py) so that the job's validation (training/config.py) can
check an entry without importing the data pipeline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneyard.training.errors import UserError

# --- LLaMA-Factory: data/dataset_info.json ---------------------------------------------------------------------

LLAMAFACTORY_KEYS = ("file_name", "hf_hub_url", "formatting", "ranking", "subset", "split", "columns", "tags")
LLAMAFACTORY_UNSUPPORTED = {
    "ms_hub_url": "tuneyard reads local files and Hugging Face hub datasets: give the entry a file_name or hf_hub_url",
    "om_hub_url": "tuneyard reads local files and Hugging Face hub datasets: give the entry a file_name or hf_hub_url",
    "script_url": "a loading script runs code, which tuneyard does not do: convert the data to .json/.jsonl and give "
    "file_name",
    "cloud_file_name": "copy the file to a local or shared disk and give its file_name",
    "folder": "download the hub folder and give its local copy as file_name",
    "num_samples": "give the data.train entry a weight instead (0.5 keeps a seeded half, 2.0 repeats the rows)",
}
# LLaMA-Factory's column names and their defaults (None: the column is not read unless the entry names it)
LLAMAFACTORY_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": None,
    "messages": "conversations",
    "system": None,
    "tools": None,
    "chosen": None,
    "rejected": None,
    "kto_tag": None,
}
MEDIA_COLUMNS = ("images", "videos", "audios")
LLAMAFACTORY_TAGS = (
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "observation_tag",
    "function_tag",
    "system_tag",
)

# --- Axolotl: a `datasets:` entry ---------------------------------------------------------------------------------

# the types tuneyard reads, the format their rows become, and the entry keys each type reads
AXOLOTL_TYPES = {
    "chat_template": (
        "messages",
        (
            "field_messages",
            "message_property_mappings",
            "roles",
            "roles_to_train",
            "train_on_eos",
            "message_field_training",
            "field_tools",
            "field_system",
        ),
    ),
    "alpaca": ("alpaca", ()),
    "chat_template.default": (
        "preference",
        ("field_messages", "field_chosen", "field_rejected", "message_property_mappings", "roles"),
    ),
    "chat_template.argilla_chat": ("preference", ("message_property_mappings", "roles")),
}
AXOLOTL_FIELDS = sorted({key for _, keys in AXOLOTL_TYPES.values() for key in keys})
TEMPLATE_KEYS = "set data.chat_template for the job: tuneyard renders every source with one template"
AXOLOTL_UNSUPPORTED = {
    "chat_template": TEMPLATE_KEYS,
    "chat_template_jinja": TEMPLATE_KEYS + " (a .jinja file is taken)",
    "conversation": TEMPLATE_KEYS,
    "data_files": "point path at the data file itself (tuneyard reads .jsonl, .json, .parquet and .txt)",
    "ds_type": "tuneyard reads the file type from its suffix: point path at a .jsonl, .json, .parquet or .txt file",
    "train_on_eot": "tuneyard counts the template's end-of-turn token as an EOS token: train_on_eos covers both",
    "message_field_training_detail": "tuneyard masks whole turns: split the turn, or use message_field_training",
    "shards": "give the entry a weight instead (0.5 keeps a seeded half)",
    "shards_idx": "give the entry a weight instead (0.5 keeps a seeded half)",
    "preprocess_shards": "tuneyard tokenises on the driver into its own cache; remove the key",
    "drop_system_message": "remove the system turns from the data, or map them away with roles",
    "split_thinking": "put the reasoning in the assistant content and use a template that renders it",
    "field_thinking": "put the reasoning in the assistant content and use a template that renders it",
    "template_thinking_key": "put the reasoning in the assistant content and use a template that renders it",
    "revision": "download that revision and point path at the local copy",
    "trust_remote_code": "dataset scripts run code, which tuneyard does not do; convert the data to .jsonl",
    "input_transform": "transform the rows beforehand and point path at the result",
    "input_format": "transform the rows beforehand and point path at the result",
    "field": "it is read by type completion, which tuneyard does not read: use data.format text and data.text_field",
    "field_human": "convert the rows to messages and use type chat_template",
    "field_model": "convert the rows to messages and use type chat_template",
    "logprobs_field": "tuneyard has no logprob distillation from data; remove the key",
    "temperature": "tuneyard has no logprob distillation from data; remove the key",
}
AXOLOTL_LEGACY_FIELDS = {"message_field_role": "role", "message_field_content": "content"}
# Axolotl's default speakers, and the roles they stand for
AXOLOTL_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}
EOS_CHOICES = ("turn", "all", "last", "none")
CHAT_KIND = ("alpaca", "sharegpt", "messages")


def _axolotl_problem(data: dict) -> str | None:
    """Why an Axolotl entry cannot be read as given (None: it can)."""
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in AXOLOTL_TYPES:
        return (
            f"type {kind!r} is not an Axolotl dataset type tuneyard reads; it reads {', '.join(AXOLOTL_TYPES)}. For "
            "other shapes, leave out type and set data.format (messages, sharegpt, alpaca, preference, "
            "unpaired_preference) with data.columns"
        )
    for key in data:
        if key in AXOLOTL_UNSUPPORTED:
            return f"Axolotl's key '{key}' is not supported by tuneyard: {AXOLOTL_UNSUPPORTED[key]}"
    reads = AXOLOTL_TYPES[kind][1]
    for key in AXOLOTL_FIELDS:
        if data.get(key) is not None and key not in reads:
            return f"'{key}' is not read by type {kind} (it reads {', '.join(reads) or 'no other key'}); remove it"
    if "roles_to_train" in data and data["roles_to_train"] is None:
        return (
            "roles_to_train: null is Axolotl's legacy mode (loss on the last message only); leave roles_to_train out "
            "and set data.train_on: last_assistant instead"
        )
    return None


def check_source_entry(data: Any) -> Any:
    """A data source as given, checked as an LLaMA-Factory or Axolotl entry when it is one (path filled in from
    dataset_info). Raises ValueError naming the key, which the job's validation reports with the entry's place."""
    if not isinstance(data, dict):
        return data
    if data.get("dataset_info") is not None:
        extra = sorted(set(data) - {"dataset_info", "name", "weight", "path"})
        if extra:
            raise ValueError(
                f"an entry with dataset_info takes name (the dataset's name in it) and weight, not {extra}: the "
                "dataset_info entry gives the file, split and columns"
            )
        if not isinstance(data.get("name"), str) or not data["name"]:
            raise ValueError("an entry with dataset_info needs name: the dataset's name in that dataset_info.json")
        if data.get("path") is not None and not Path(str(data["path"])).is_absolute():
            raise ValueError("give dataset_info or path, not both: dataset_info names the file to read")
        registry = data.get("path") or data["dataset_info"]
        try:
            llamafactory_entry(str(registry), data["name"])
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return {**data, "path": registry}
    if data.get("type") is not None:
        data = dict(data)
        mappings = dict(data.get("message_property_mappings") or {})
        for legacy, prop in AXOLOTL_LEGACY_FIELDS.items():
            if data.get(legacy) is not None:
                if mappings.get(prop, data[legacy]) != data[legacy]:
                    raise ValueError(f"{legacy} and message_property_mappings.{prop} differ; keep one")
                mappings[prop] = data[legacy]
            data.pop(legacy, None)
        if mappings:
            data["message_property_mappings"] = mappings
        problem = _axolotl_problem(data)
        if problem:
            raise ValueError(problem)
        return data
    given = [key for key in (*AXOLOTL_FIELDS, *AXOLOTL_LEGACY_FIELDS) if data.get(key) is not None]
    if given:
        raise ValueError(
            f"'{given[0]}' is a key of an Axolotl dataset entry, which names its type; add type (one of "
            f"{', '.join(AXOLOTL_TYPES)})"
        )
    return data


@dataclass(frozen=True)
class LlamaFactoryEntry:
    """One dataset of a dataset_info.json: where its rows are and how LLaMA-Factory reads them."""

    name: str
    registry: Path
    file: str  # a local path (resolved against the registry's folder) or a hub dataset name
    hub: bool
    split: str
    subset: str | None
    formatting: str
    ranking: bool
    columns: dict[str, str | None]
    tags: dict[str, str]

    @property
    def where(self) -> str:
        """The entry's place, for messages."""
        return f"{self.registry}: dataset '{self.name}'"

    def column(self, key: str) -> str | None:
        """The row's column LLaMA-Factory reads for `key` (prompt, chosen, kto_tag, ...)."""
        return self.columns.get(key)


def _registry(path: Path) -> dict:
    if not path.is_file():
        raise UserError(
            f"dataset_info '{path}' does not exist (or is a folder); give the path of LLaMA-Factory's "
            "dataset_info.json (relative paths are relative to the directory tuneyard runs in)"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the dataset_info.json as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: a dataset_info.json maps dataset names to entries, {{name: {{file_name: ...}}}}")
    return info


def _names(value: Any, allowed: tuple[str, ...], what: str, where: str) -> dict[str, str]:
    """An entry's columns or tags: an object of known keys to strings."""
    if not isinstance(value, dict):
        raise UserError(f"{where}: '{what}' must be an object ({{key: name}})")
    for key, name in value.items():
        if key in MEDIA_COLUMNS and what == "columns":
            raise UserError(
                f"{where}: columns.{key} is not supported by tuneyard, which trains text models; remove it (and "
                "the media placeholders from the text)"
            )
        if key not in allowed:
            raise UserError(f"{where}: '{what}.{key}' is not a LLaMA-Factory {what} key; keys are {', '.join(allowed)}")
        if not isinstance(name, str) or not name:
            raise UserError(f"{where}: '{what}.{key}' must name a {'column' if what == 'columns' else 'tag'}")
    return value


def llamafactory_entry(registry: str, name: str) -> LlamaFactoryEntry:
    """The entry `name` of a dataset_info.json, each key checked: one we do not read is refused, naming it."""
    path = Path(registry).expanduser()
    info = _registry(path)
    if name not in info:
        known = ", ".join(sorted(info)[:30]) or "none"
        raise UserError(f"{path}: no dataset named '{name}'; its datasets are {known}")
    entry, where = info[name], f"{path}: dataset '{name}'"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: an entry is an object ({{file_name: ..., formatting: ..., columns: ...}})")
    for key in entry:
        if key in LLAMAFACTORY_UNSUPPORTED:
            raise UserError(f"{where}: key '{key}' is not supported by tuneyard: {LLAMAFACTORY_UNSUPPORTED[key]}")
        if key not in LLAMAFACTORY_KEYS:
            raise UserError(
                f"{where}: '{key}' is not a key of a LLaMA-Factory dataset entry tuneyard reads; keys are "
                f"{', '.join(LLAMAFACTORY_KEYS)}"
            )
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        hint = (
            " (for OpenAI-style messages give formatting: sharegpt with tags {role_tag: role, content_tag: content, "
            "user_tag: user, assistant_tag: assistant, system_tag: system})"
            if formatting == "openai"
            else ""
        )
        raise UserError(
            f"{where}: formatting '{formatting}' is not read by tuneyard; it reads alpaca and sharegpt{hint}"
        )
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise UserError(f"{where}: 'ranking' must be true or false")
    columns = {
        **LLAMAFACTORY_COLUMNS,
        **_names(entry.get("columns", {}), tuple(LLAMAFACTORY_COLUMNS), "columns", where),
    }
    if ranking:  # LLaMA-Factory needs them named; their usual names are the obvious default
        columns["chosen"] = columns["chosen"] or "chosen"
        columns["rejected"] = columns["rejected"] or "rejected"
    if ranking and columns["kto_tag"]:
        raise UserError(f"{where}: a ranking entry compares two answers, a kto_tag one judges one: keep one of them")
    tags = _names(entry.get("tags", {}), LLAMAFACTORY_TAGS, "tags", where)
    if tags and formatting != "sharegpt":
        raise UserError(f"{where}: 'tags' are read with formatting: sharegpt, not {formatting}; remove them")
    for key in ("split", "subset"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise UserError(f"{where}: '{key}' must be a string")
    hub = entry.get("hf_hub_url") is not None
    if hub:
        file = str(entry["hf_hub_url"])
    elif entry.get("file_name") is not None:
        file = str((path.parent / str(entry["file_name"])).resolve())
    else:
        raise UserError(f"{where}: the entry gives neither file_name nor hf_hub_url; add the file's name")
    return LlamaFactoryEntry(
        name, path, file, hub, entry.get("split") or "train", entry.get("subset"), formatting, ranking, columns, tags
    )
