"""Job config: composition, overrides, unknown keys with line and suggestion, path resolution."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from tuneyard.launch.config import apply_override, load_job
from tuneyard.training.errors import UserError

GOOD = """\
stage: sft
model:
  name_or_path: org/some-model
data:
  format: messages
  train: data/train.jsonl
training:
  learning_rate: 1.0e-4
output:
  dir: runs/x
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_and_path_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = load_job(write(tmp_path, GOOD))
    assert job.deepspeed.zero_stage == 2 and job.cluster.workers == 1 and job.output.resume == "auto"
    assert job.model.name_or_path == "org/some-model"  # a hub id stays a hub id
    assert job.data.train[0].path == str(tmp_path / "data" / "train.jsonl")
    assert job.output.dir == str(tmp_path / "runs" / "x")


def test_overrides_parse_yaml_values(tmp_path):
    job = load_job(
        write(tmp_path, GOOD),
        ["training.learning_rate=3e-4", "deepspeed.zero_stage=3", "training.gradient_checkpointing=true"],
    )
    assert job.training.learning_rate == 3e-4 and job.deepspeed.zero_stage == 3
    assert job.training.gradient_checkpointing is True


def test_unknown_key_names_path_line_and_closest(tmp_path):
    text = GOOD.replace("  learning_rate: 1.0e-4", "  learning_rat: 1.0e-4")
    with pytest.raises(UserError) as info:
        load_job(write(tmp_path, text))
    assert f"{tmp_path / 'job.yaml'}:8: unknown key 'training.learning_rat'; did you mean 'learning_rate'?" in str(
        info.value
    )


def test_unknown_override_key_and_bad_value(tmp_path):
    with pytest.raises(UserError) as info:
        load_job(write(tmp_path, GOOD), ["deepspeed.zero_stag=3", "training.batch_size=0"])
    message = str(info.value)
    assert "unknown key 'deepspeed.zero_stag'; did you mean 'zero_stage'?" in message
    assert "'training.batch_size': Input should be greater than or equal to 1" in message


def test_scratch_needs_architecture(tmp_path):
    with pytest.raises(UserError, match="model.init: scratch needs model.architecture"):
        load_job(write(tmp_path, GOOD.replace("  name_or_path: org/some-model", "  init: scratch")))


def test_malformed_override():
    with pytest.raises(UserError, match="is not of the form key.sub=value"):
        apply_override({}, "training.max_steps")


def test_validate_command_prints_resolved_job(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tuneyard.launch.cli", "validate", str(write(tmp_path, GOOD)), "training.max_steps=5"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "max_steps: 5" in out.stdout and "zero_stage: 2" in out.stdout


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "examples" / "configs").glob("*.yaml")))
def test_every_example_config_validates(path):
    assert load_job(path).output.dir.endswith(f"runs/{path.stem}")  # each example writes its own run


def test_every_example_pipeline_validates():
    from tuneyard.launch.pipeline import load_pipeline

    stages = {
        "tiny.yaml": ["pretrain", "sft", "reward", "dpo"],
        "rl-tiny.yaml": ["pretrain", "sft", "ppo"],
        "rl-vllm-tiny.yaml": ["pretrain", "sft", "ppo"],
        "tools-tiny.yaml": ["pretrain", "sft", "ppo"],
    }
    paths = sorted((Path(__file__).parent.parent / "examples" / "pipelines").glob("*.yaml"))
    assert {p.name: [job.stage for job in load_pipeline(p)] for p in paths} == stages


def test_qlora_policy_under_zero3_is_refused_for_ppo(tmp_path):
    text = GOOD.replace("stage: sft", "stage: ppo").replace("format: messages", "format: prompt")
    path = write(tmp_path, text + "peft:\n  method: qlora\nppo:\n  roles:\n    policy:\n      zero_stage: 3\n")
    with pytest.raises(UserError, match="peft.method qlora under ZeRO-3 .* PPO.s policy gathers its whole weights"):
        load_job(path)


def test_dpo_max_prompt_length_is_an_unknown_key(tmp_path):
    import dataclasses

    from trl import DPOConfig

    # TRL 1.16's DPOConfig truncates the whole sequence to max_length and has no prompt limit to pass on, so
    # the key that did nothing is gone; an old job naming it is told so instead of being silently ignored
    assert "max_prompt_length" not in {f.name for f in dataclasses.fields(DPOConfig)}
    text = GOOD.replace("stage: sft", "stage: dpo").replace("format: messages", "format: preference")
    with pytest.raises(UserError, match=r"unknown key 'dpo.max_prompt_length'"):
        load_job(write(tmp_path, text + "dpo:\n  max_prompt_length: 64\n"))


# Keys read only through a whole-section model_dump (none today): "section.key": "why it is consumed".
READ_WHOLE: dict[str, str] = {}
CONFIG_MODULES = ("cluster/config.py", "training/config.py", "rlhf/config.py", "launch/config.py")


def _leaves(model: type[BaseModel], path: tuple[str, ...] = ()):
    """(dotted path, owning model) of every leaf key under a pydantic model, through nested and listed sections."""
    for name, field in model.model_fields.items():
        stack, sections = [field.annotation], []
        while stack:  # Optional[X], list[X], X | str: the sections inside the annotation
            current = stack.pop()
            if isinstance(current, type) and issubclass(current, BaseModel):
                sections.append(current)
            stack.extend(getattr(current, "__args__", ()))
        if not sections:
            yield (*path, name), model
        for section in sections:
            yield from _leaves(section, (*path, name))


def _reads(source: str) -> tuple[set[str], set[str]]:
    """The attribute names and exact string constants (dict keys, getattr names) of a module; its other names."""
    used, names = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            used.add(node.value)  # docstrings too, but a docstring is never exactly one key's name
        elif isinstance(node, ast.Name):
            names.add(node.id)
    return used, names


def unread_keys(job_model: type[BaseModel]) -> list[str]:
    """Leaf keys of the job schema that no package module outside the config modules reads.

    A key counts as read where a module has it as an attribute (`x.key`) or an exact string ("key").
    A name that several sections share (beta, workers, temperature, ...) must be read in a module that
    also names its section (`.dpo`, "policy") or its model class, so `ppo.max_prompt_length` being read
    does not cover a `dpo.max_prompt_length` nobody reads.
    """
    root = Path(__file__).resolve().parent.parent
    modules = {
        path: _reads(path.read_text())
        for package in ("cluster", "training", "rlhf", "launch")
        for path in (root / package).rglob("*.py")
        if str(path.relative_to(root)) not in CONFIG_MODULES
    }
    leaves = list(_leaves(job_model))
    owners: dict[str, set[type]] = {}
    for path, model in leaves:
        owners.setdefault(path[-1], set()).add(model)
    unread = []
    for path, model in leaves:
        key, dotted = path[-1], ".".join(path)
        readers = [m for m, (used, _) in modules.items() if key in used]
        if len(owners[key]) > 1 and len(path) > 1:
            readers = [m for m in readers if path[-2] in modules[m][0] or model.__name__ in modules[m][1]]
        if not readers and dotted not in READ_WHOLE:
            unread.append(dotted)
    return unread


def test_every_job_key_is_read_by_the_code():
    from tuneyard.launch.config import JobConfig

    assert unread_keys(JobConfig) == [], "keys the schema accepts but no code reads: wire them up or remove them"


def test_an_unread_key_is_found_even_when_another_section_reads_its_name():
    from pydantic import create_model

    from tuneyard.launch.config import JobConfig
    from tuneyard.rlhf.config import DpoSection

    # the key this check was written for: accepted, never passed to TRL, while ppo.max_prompt_length is read
    old_dpo = create_model("OldDpoSection", __base__=DpoSection, max_prompt_length=(int | None, None))
    old_job = create_model("OldJobConfig", __base__=JobConfig, dpo=(old_dpo, old_dpo()))
    assert unread_keys(old_job) == ["dpo.max_prompt_length"]


def test_identity_ignores_sections_the_stage_does_not_read(tmp_path):
    from tuneyard.training.run_dir import job_identity

    def identity(text: str, *overrides: str) -> str:
        return job_identity(load_job(write(tmp_path, text), list(overrides)).identity_dump())

    assert identity(GOOD) == identity(
        GOOD, "ppo.iterations=7", "dpo.beta=0.3", "training.max_failures=0", "training.max_nonfinite_steps=9"
    )
    assert identity(GOOD) != identity(GOOD, "training.learning_rate=3e-4")
    ppo = GOOD.replace("stage: sft", "stage: ppo").replace("format: messages", "format: prompt")
    assert identity(ppo) != identity(ppo, "ppo.iterations=7") and identity(ppo) == identity(ppo, "dpo.beta=0.3")


def test_a_key_given_twice_names_both_lines_at_any_depth(tmp_path):
    text = GOOD + "training:\n  max_steps: 5\n  max_steps: 6\n"
    with pytest.raises(UserError) as info:
        load_job(write(tmp_path, text))
    path = tmp_path / "job.yaml"
    assert str(info.value).splitlines() == [
        f"{path}:7 and {path}:11: 'training' is given twice; keep one",
        f"{path}:12 and {path}:13: 'training.max_steps' is given twice; keep one",
    ]
    listed = GOOD.replace("  train: data/train.jsonl", "  train:\n    - path: a.jsonl\n      path: b.jsonl")
    with pytest.raises(UserError, match=r"job.yaml:7 and .*job.yaml:8: 'data.train.0.path' is given twice"):
        load_job(write(tmp_path, listed))


def test_a_pipeline_key_given_twice_is_refused(tmp_path):
    from tuneyard.launch.pipeline import load_pipeline

    path = tmp_path / "pipeline.yaml"
    path.write_text("stages:\n  - job: a.yaml\nstages:\n  - job: b.yaml\n")
    with pytest.raises(UserError, match=r"pipeline.yaml:1 and .*pipeline.yaml:3: 'stages' is given twice; keep one"):
        load_pipeline(path)
