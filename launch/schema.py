"""The job file's JSON Schema and its reference page, both generated from the config models (`JobConfig`).

The schema is pydantic's validation schema of `JobConfig`, widened where the loader reads more than a field's type
says (a bare path for `data.train`, a number for a memory size, an LLaMA-Factory entry without `path`) and narrowed
where a field validator refuses what the type allows (an empty path, an Axolotl type tuneyard does not read). Rules
across keys (the model validators) are checked by `tuneyard validate` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tuneyard.launch.config import OPTIONAL_SECTIONS, JobConfig
from tuneyard.training.data.registry_entries import AXOLOTL_LEGACY_FIELDS, AXOLOTL_TYPES
from tuneyard.training.stages import STAGES

# the copy beside this module, which the shipped examples name in their `# yaml-language-server: $schema=` line
SCHEMA_FILE = Path(__file__).with_name("tuneyard.schema.json")
DRAFT = "https://json-schema.org/draft/2020-12/schema"
SECTION_ORDER = ("stage", "model", "data", "training", "peft", "deepspeed", "cluster", "output", *OPTIONAL_SECTIONS)
# cluster/config.parse_size: a number, then one of its units, any case
SIZE_PATTERN = r"^\s*[0-9]*\.?[0-9]+\s*([bB]|[kKmMgGtT]([bB]|[iI][bB])?)?\s*$"
NOT_BLANK = r"\S"
PATTERN_TEXT = {SIZE_PATTERN: "a size: 80GiB, 80GB, 512G (or bytes)", NOT_BLANK: "not empty"}


def job_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a job file: JobConfig's, with the loader's own readings of some keys."""
    schema = JobConfig.model_json_schema(mode="validation", by_alias=True)
    defs = schema["$defs"]
    for model in defs.values():
        for prop in model.get("properties", {}).values():
            prop.pop("title", None)
    schema["properties"] = {key: schema["properties"][key] for key in SECTION_ORDER}
    _data_sources(defs)
    for key in ("gpu_memory", "cpu_memory"):  # parse_size takes a number of bytes too
        prop = defs["ClusterConfig"]["properties"][key]
        prop["anyOf"] = [{"type": "string", "pattern": SIZE_PATTERN}, {"type": "number"}, {"type": "null"}]
    schema.pop("title", None)
    head = {
        "$schema": DRAFT,
        "title": "tuneyard job file",
        "description": "One tuneyard training job; `tuneyard validate` checks it, the rules across keys too.",
    }
    return head | {key: schema[key] for key in ("type", "properties", "required", "additionalProperties", "$defs")}


def _data_sources(defs: dict) -> None:
    """data.train/eval as `_as_sources` reads them, and an entry as `check_source_entry` does."""
    source = {"anyOf": [{"type": "string", "pattern": NOT_BLANK}, {"$ref": "#/$defs/DataSource"}]}
    data = defs["DataConfig"]["properties"]
    data["train"] = {
        "description": data["train"]["description"],
        "anyOf": [source, {"type": "array", "minItems": 1, "items": source}],
    }
    data["eval"] = {
        "description": data["eval"]["description"],
        "anyOf": [source, {"type": "array", "items": source}, {"type": "null"}],
        "default": None,
    }
    entry = defs["DataSource"]
    entry["properties"]["path"]["pattern"] = NOT_BLANK
    entry.pop("required", None)  # an LLaMA-Factory entry names its file through dataset_info
    entry["anyOf"] = [{"required": ["path"]}, {"required": ["dataset_info"]}]
    entry["properties"]["type"]["anyOf"] = [{"type": "string", "enum": list(AXOLOTL_TYPES)}, {"type": "null"}]
    for legacy, prop in AXOLOTL_LEGACY_FIELDS.items():
        entry["properties"][legacy] = {
            "type": "string",
            "description": f"Axolotl's older spelling of message_property_mappings.{prop}",
        }


def schema_text() -> str:
    """The schema as `tuneyard schema` prints it and launch/tuneyard.schema.json holds it."""
    return json.dumps(job_schema(), indent=2) + "\n"


# --- the reference page ------------------------------------------------------------------------------------------


def reference_markdown() -> str:
    """The job-file reference: every section and key with its type, default, allowed values and description."""
    schema = job_schema()
    lines = [
        "# Job-file reference",
        "",
        "Every section and key of a job file, generated from the config models when the site is built. A key left",
        "out takes its default; a key not listed here is an error that names the closest valid one. "
        "`tuneyard validate JOB.yaml` prints a job with every default filled in.",
        "",
        "Rules across keys (for example `ppo.mini_batch_size` must divide the samples of an iteration) are checked",
        "by `tuneyard validate` and noted under their section; the [JSON Schema](job-file.md#editor-completion) checks",
        "each key on its own.",
        "",
        "## Top level {#top-level}",
        "",
        _model_note(JobConfig),
        "",
        *_table(JobConfig, schema, "", schema),
    ]
    for key in SECTION_ORDER:
        field = JobConfig.model_fields[key]
        model = _section_model(field)
        if model is not None:
            lines += _section(model, key, _def_of(schema, model), schema, level=2)
    return "\n".join(lines) + "\n"


def _section(model: type[BaseModel], path: str, model_schema: dict, schema: dict, level: int) -> list[str]:
    """A section's heading, what it is, its keys, then its own sections (one level deeper)."""
    heading = f"{'#' * level} `{path}` {{#{_anchor(path)}}}"
    lines = ["", heading, "", _model_note(model), "", *_table(model, model_schema, path, schema)]
    for name, field in model.model_fields.items():
        sub = _section_model(field)
        key = f"{path}.{field.alias or name}{'[]' if _is_list(field) else ''}"
        # data.eval's entries are documented once, with data.train's (where its link points)
        if sub is not None and _anchor_of(schema, sub.__name__, key.removesuffix("[]")) == _anchor(key):
            lines += _section(sub, key, _def_of(schema, sub), schema, level=min(level + 1, 4))
    return lines


def _anchor(path: str) -> str:
    """The anchor of a key or section: its dotted path, `[]` (a list's entries) written as `-entry`."""
    return path.replace("[]", "-entry")


def _model_note(model: type[BaseModel]) -> str:
    """The model's docstring on one line, and whether it has rules across its keys."""
    text = " ".join((model.__doc__ or "").split())
    if model.__pydantic_decorators__.model_validators:
        text += " Rules across these keys are checked by `tuneyard validate`."
    return _escape(text)


def _table(model: type[BaseModel], model_schema: dict, path: str, schema: dict) -> list[str]:
    """One row per key: key (with its anchor), type, default, allowed values, description."""
    rows = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    props = model_schema["properties"]
    for key, prop in props.items():
        field = _field(model, key)
        dotted = f"{path}.{key}" if path else key
        if field is None:  # a key the schema adds (an older spelling the loader also reads)
            kind, allowed, default = _describe(prop, schema, dotted)[0], "", ""
        else:
            kind, allowed = _describe(prop, schema, dotted)
            default = _default_text(field)
        if key == "stage":
            allowed = ", ".join(f"`{name}`" for name in STAGES)
        description = _escape(" ".join(str(prop.get("description", "")).split()))
        # a section's own heading carries its anchor
        anchor = "" if f"(#{_anchor(dotted)})" in kind else f"{{#{_anchor(dotted)}}}"
        rows.append(f"| `{key}`{anchor} | {kind} | {default} | {allowed} | {description} |")
    return rows


def _field(model: type[BaseModel], key: str) -> FieldInfo | None:
    """The model field a schema key names (by alias or by name)."""
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    """The config model a field holds (itself, in a list, or optional), if any."""
    stack = [field.annotation]
    while stack:
        annotation = stack.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        stack.extend(getattr(annotation, "__args__", ()))
    return None


def _is_list(field: FieldInfo) -> bool:
    """Whether the field holds a list of entries (data.train, reward.functions)."""
    return "list[" in str(field.annotation)


def _def_of(schema: dict, model: type[BaseModel]) -> dict:
    """The $defs entry of a config model."""
    return schema["$defs"][model.__name__]


def _describe(prop: dict, schema: dict, dotted: str) -> tuple[str, str]:
    """(type, allowed values) of one key's schema, in words."""
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[-1]
        word = "entry" if name in ("DataSource", "RewardFunction") else "section"
        return f"[{word}](#{_anchor_of(schema, name, dotted)})", ""
    if "anyOf" in prop:
        options = prop["anyOf"]
        # `X or a list of X` (data.train): the list written once
        listed = [o for o in options if o.get("type") == "array" and o.get("items") in options]
        parts = [_describe(option, schema, dotted) for option in options if option not in listed]
        kinds = list(dict.fromkeys(kind for kind, _ in parts))
        allowed = list(dict.fromkeys(a for _, a in parts if a))
        if listed:
            kinds[kinds.index(_describe(listed[0]["items"], schema, dotted)[0])] += ", or a list of them"
            allowed += [f"at least {listed[0]['minItems']} in a list"] if listed[0].get("minItems") else []
        return " or ".join(kinds), "; ".join(allowed)
    kind = prop.get("type", "any")
    if kind == "array":
        inner, allowed = _describe(prop.get("items", {}), schema, dotted)
        kind = f"list of {inner}"
        if prop.get("minItems"):
            allowed = "; ".join(x for x in (f"at least {prop['minItems']}", allowed) if x)
        return kind, allowed
    if kind == "object":
        values = prop.get("additionalProperties")
        kind = f"mapping of {values['type']}" if isinstance(values, dict) and "type" in values else "mapping"
        if isinstance(values, dict) and values.get("type") == "array":
            kind = f"mapping of list of {values['items']['type']}"
    allowed = []
    if "enum" in prop:
        allowed.append(", ".join(f"`{_yaml(v)}`" for v in prop["enum"]))
    if "const" in prop:
        allowed.append(f"`{_yaml(prop['const'])}`")
    for word, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if word in prop:
            allowed.append(f"{sign} {_yaml(prop[word])}")
    if "pattern" in prop:
        allowed.append(PATTERN_TEXT.get(prop["pattern"], f"matches `{prop['pattern']}`"))
    return {"null": "null", "number": "number", "integer": "integer"}.get(kind, kind), ", ".join(allowed)


def _anchor_of(schema: dict, name: str, dotted: str) -> str:
    """The anchor of the section a key holds: the key's own path (`data.train-entry` for a list's entries)."""
    if name == "DataSource":  # data.eval's entries are documented with data.train's
        return f"{dotted.rsplit('.', 1)[0]}.train-entry"
    if name == "RewardFunction":
        return f"{dotted}-entry"
    return _anchor(dotted)


def _default_text(field: FieldInfo) -> str:
    """The default as a job file would write it; `required` for a key without one; blank for a section."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    """A value written as in YAML (flow style for lists)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | dict):
        return json.dumps(value).replace('"', "")
    return str(value)


def _escape(text: str) -> str:
    """Text for a table cell: pipes and angle brackets escaped outside code spans."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside backticks
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)
