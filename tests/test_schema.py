"""The job file's JSON Schema (`tuneyard schema`, launch/tuneyard.schema.json) agrees with `tuneyard validate`.

Every shipped example passes both. Then, for every key of every section, a job with a wrong type, a value just
outside the key's range (or its choices), and an unknown key beside it is refused by both, at that key; a value at
the edge of a range passes both. Rules across keys (model validators) are `tuneyard validate`'s alone. Where the
loader converts a value the schema does not (a quoted number, 0/1 for a switch), the schema is the stricter.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from tuneyard.launch.cli import main
from tuneyard.launch.config import JobConfig, load_job
from tuneyard.launch.schema import SCHEMA_FILE, job_schema, schema_text

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
SCHEMA = job_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
BASE = yaml.safe_load((ROOT / "examples" / "configs" / "sft-tiny.yaml").read_text())
# what a list of entries holds before one of its keys is changed
ENTRY_SEEDS = {
    ("data", "train"): {"path": "examples/data/last-word-train.jsonl"},
    ("data", "eval"): {"path": "examples/data/last-word-eval.jsonl"},
    ("reward", "functions"): {"name": "last_word_exact"},
}
# the required keys of a section that has some, seeded when a test sets another of its keys
SECTION_SEEDS = {("reward", "remote"): {"url": "http://127.0.0.1:9/score"}}
UNKNOWN = "no_such_key"


def test_shipped_schema_file_is_current():
    assert SCHEMA_FILE.read_text() == schema_text(), (
        "launch/tuneyard.schema.json differs from the models: run `tuneyard schema > launch/tuneyard.schema.json`"
    )


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_cli_prints_the_schema(capsys):
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == SCHEMA


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_shipped_example_passes_both(example):
    load_job(example)  # raises UserError on any problem
    errors = list(VALIDATOR.iter_errors(yaml.safe_load(example.read_text())))
    assert not errors, [e.message for e in errors]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_shipped_example_names_the_schema(example):
    first = example.read_text().splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix), f"{example.name}: the first line should be {prefix}..."
    assert (example.parent / first.removeprefix(prefix)).resolve() == SCHEMA_FILE


# --- every key, changed one at a time ---------------------------------------------------------------------------


def _resolve(prop: dict) -> dict:
    """A property's schema with a top-level $ref followed."""
    while "$ref" in prop:
        prop = SCHEMA["$defs"][prop["$ref"].rsplit("/", 1)[-1]]
    return prop


def _options(prop: dict) -> list[dict]:
    """The alternatives a property accepts (anyOf flattened, $refs followed; an array's items one level down)."""
    prop = _resolve(prop)
    if "anyOf" in prop and "properties" not in prop:  # an entry's own anyOf says which keys it requires
        return [option for part in prop["anyOf"] for option in _options(part)]
    return [prop]


def _json_types(prop: dict) -> set[str]:
    """The JSON types a property accepts at its own level."""
    return {option.get("type", "object" if "properties" in option else "any") for option in _options(prop)}


def _entries(prop: dict) -> list[dict]:
    """The object schemas of a list's entries, if the key takes a list of entries (data.train, reward.functions)."""
    lists = [option for option in _options(prop) if option.get("type") == "array"]
    return [item for option in lists for item in _options(option.get("items", {})) if "properties" in item]


def _keys(schema: dict, path: tuple) -> list[tuple[tuple, dict]]:
    """(path, schema) of every key under an object schema; a list of entries is walked through its item 0."""
    found = []
    for key, prop in _resolve(schema).get("properties", {}).items():
        here = (*path, key)
        found.append((here, prop))
        entries = _entries(prop)
        for option in entries or [o for o in _options(prop) if "properties" in o]:
            found += _keys(option, (*here, 0) if entries else here)
    return found


def _sections(schema: dict, path: tuple) -> list[tuple]:
    """The path of every object (section or entry) under an object schema, itself first."""
    found = [path]
    for key, prop in _resolve(schema).get("properties", {}).items():
        here = (*path, key)
        entries = _entries(prop)
        for option in entries or [o for o in _options(prop) if "properties" in o]:
            found += [p for p in _sections(option, (*here, 0) if entries else here) if p not in found]
    return found


def _with(path: tuple, value: object) -> dict:
    """The base job (examples/configs/sft-tiny.yaml) with `value` at `path`, entries seeded on the way."""
    tree = copy.deepcopy(BASE)
    node = tree
    for i, part in enumerate(path[:-1]):
        following = path[i + 1]
        if isinstance(following, int):
            node[part] = [copy.deepcopy(ENTRY_SEEDS[tuple(p for p in path[: i + 1] if isinstance(p, str))[-2:]])]
        elif isinstance(part, int):
            pass
        elif not isinstance(node.get(part), dict):
            node[part] = copy.deepcopy(SECTION_SEEDS.get(tuple(p for p in path[: i + 1] if isinstance(p, str)), {}))
        node = node[part]
    node[path[-1]] = value
    return tree


def _wrong_type(prop: dict) -> object:
    """A value of a JSON type the key does not take."""
    types = _json_types(prop)
    for value, kind in (({"wrong": "type"}, "object"), (["wrong", "type"], "array"), ("wrong type", "string")):
        if kind not in types:
            return value
    return 12345


def _outside(prop: dict) -> list[object]:
    """Values just outside the key's range, choices or pattern (one per bound)."""
    values = []
    for option in _options(prop):
        integer = option.get("type") == "integer"
        step = 1 if integer else 0.5
        if "minimum" in option:
            values.append(option["minimum"] - step)
        if "exclusiveMinimum" in option:
            values.append(option["exclusiveMinimum"])
        if "maximum" in option:
            values.append(option["maximum"] + step)
        if "exclusiveMaximum" in option:
            values.append(option["exclusiveMaximum"])
        if "enum" in option:
            values.append(7 if integer else "not-a-choice")
        if "pattern" in option:
            values.append("   " if option["pattern"] == r"\S" else "80 parsecs")
        if option.get("minItems"):
            values.append([])
    return values


def _edges(prop: dict) -> list[object]:
    """Values at the edge of the key's range, inside it."""
    values = []
    for option in _options(prop):
        integer = option.get("type") == "integer"
        if "minimum" in option:
            values.append(option["minimum"])
        if "exclusiveMinimum" in option:
            values.append(option["exclusiveMinimum"] + (1 if integer else 0.01))
        if "maximum" in option:
            values.append(option["maximum"])
        if "exclusiveMaximum" in option:
            values.append(option["exclusiveMaximum"] - (1 if integer else 0.01))
    return values


KEYS = _keys(SCHEMA, ())
REFUSED = [
    *[(f"wrong type {'.'.join(map(str, p))}", p, _wrong_type(prop)) for p, prop in KEYS],
    *[(f"outside {'.'.join(map(str, p))}={v!r}", p, v) for p, prop in KEYS for v in _outside(prop)],
]
EDGES = [(f"edge {'.'.join(map(str, p))}={v!r}", p, v) for p, prop in KEYS for v in _edges(prop)]


def _pydantic_errors(tree: dict) -> list[tuple[tuple, str]]:
    """(location, message) of each error `tuneyard validate` finds (JobConfig's validation)."""
    try:
        JobConfig.model_validate(tree)
    except ValidationError as exc:
        return [
            (tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))), e["msg"])
            for e in exc.errors()
        ]
    return []


def _schema_errors(tree: dict) -> list[tuple[tuple, str]]:
    """(location, message) of each schema error, the alternatives' own errors included."""
    found = []
    stack = list(VALIDATOR.iter_errors(tree))
    while stack:
        error = stack.pop()
        found.append((tuple(error.absolute_path), error.message))
        stack.extend(error.context or [])
    return found


def _at(errors: list[tuple[tuple, str]], path: tuple) -> bool:
    """Whether an error is at `path` (or below it), or above it naming the key (a check of the whole entry)."""
    return any(
        loc[: len(path)] == path or (path[: len(loc)] == loc and str(path[-1]) in message) for loc, message in errors
    )


def _elsewhere(errors: list[tuple[tuple, str]], path: tuple) -> list[tuple]:
    """Errors on another branch of the job than `path` (neither above nor below it)."""
    return [loc for loc, _ in errors if loc[: len(path)] != path and path[: len(loc)] != loc]


@pytest.mark.parametrize(("name", "path", "value"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_by_both_at_the_key(name, path, value):
    tree = _with(path, value)
    by_validate, by_schema = _pydantic_errors(tree), _schema_errors(tree)
    assert _at(by_validate, path), f"tuneyard validate does not refuse it at {path}: {by_validate}"
    assert _at(by_schema, path), f"the schema does not refuse it at {path}: {by_schema}"
    assert not _elsewhere(by_validate, path) and not _elsewhere(by_schema, path)


@pytest.mark.parametrize(("name", "path", "value"), EDGES, ids=[e[0] for e in EDGES])
def test_edge_of_a_range_passes_both(name, path, value):
    tree = _with(path, value)
    assert not [loc for loc, _ in _pydantic_errors(tree) if loc[: len(path)] == path]
    assert not _schema_errors(tree)


SECTIONS = _sections(SCHEMA, ())


@pytest.mark.parametrize("path", SECTIONS, ids=lambda p: ".".join(map(str, p)) or "top level")
def test_unknown_key_refused_by_both(path):
    tree = _with((*path, UNKNOWN), 1)
    key_path = (*path, UNKNOWN)
    assert (key_path, "Extra inputs are not permitted") in _pydantic_errors(tree)
    assert any(loc == path and UNKNOWN in message for loc, message in _schema_errors(tree))


def test_sweep_covers_every_key():
    """The sweep reaches the nested sections and entries, each key's alias included."""
    dotted = {".".join(map(str, p)) for p, _ in KEYS}
    for key in ("ppo.kl.in", "ppo.roles.rollout.kv_cache_gb", "data.train.0.weight", "reward.functions.0.name"):
        assert key in dotted
    assert len(KEYS) > 200
    assert {".".join(map(str, p)) for p in SECTIONS} >= {"", "ppo.roles.critic", "data.tags", "data.train.0"}


# --- through the command, as a user meets it ---------------------------------------------------------------------

WRONG_FILES = {
    "unknown key": ("training:\n  learnig_rate: 0.001\n", ("training", "learnig_rate"), "unknown key"),
    "wrong type": ("training:\n  max_steps: many\n", ("training", "max_steps"), "valid integer"),
    "out of range": ("ppo:\n  clip_range_low: 1.5\n", ("ppo", "clip_range_low"), "less than 1"),
    "not a choice": ("deepspeed:\n  zero_stage: 4\n", ("deepspeed", "zero_stage"), "0, 1, 2 or 3"),
    "alias": ("ppo:\n  kl: {in: neither}\n", ("ppo", "kl", "in"), "'reward' or 'loss'"),
    "empty train": ("data:\n  train: []\n", ("data", "train"), "lists no data"),
    "memory size": ("cluster:\n  gpu_memory: 80 parsecs\n", ("cluster", "gpu_memory"), "not a memory size"),
}


@pytest.mark.parametrize("case", WRONG_FILES, ids=list(WRONG_FILES))
def test_wrong_file_refused_by_validate_and_schema(case, tmp_path, capsys):
    addition, key_path, fragment = WRONG_FILES[case]
    job = tmp_path / "job.yaml"
    tree = copy.deepcopy(BASE)
    for section, values in yaml.safe_load(addition).items():
        tree[section] = {**tree.get(section, {}), **values}
    job.write_text(yaml.safe_dump(tree, sort_keys=False))
    assert main(["validate", str(job)]) == 2
    message = capsys.readouterr().err
    assert ".".join(key_path) in message and fragment in message and "job.yaml:" in message, message
    assert _at(_schema_errors(tree), key_path) or _at(_schema_errors(tree), key_path[:-1])


def test_alias_and_valid_values_pass_both(tmp_path):
    tree = copy.deepcopy(BASE)
    tree["ppo"] = {"kl": {"in": "loss"}}
    tree["cluster"] = {**tree["cluster"], "gpu_memory": "80GiB", "cpu_memory": 512 * 2**30}
    tree["data"]["train"] = [
        "examples/data/last-word-train.jsonl",
        {"path": "examples/data/last-word-train.jsonl", "weight": 0.5},
    ]
    assert not _pydantic_errors(tree)
    assert not _schema_errors(tree)
