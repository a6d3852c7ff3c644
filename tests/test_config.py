"""Job config: composition, overrides, unknown keys with line and suggestion, path resolution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import apply_override, load_job
from training.errors import UserError

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
        [sys.executable, "-m", "launch.cli", "validate", str(write(tmp_path, GOOD)), "training.max_steps=5"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "max_steps: 5" in out.stdout and "zero_stage: 2" in out.stdout


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "examples" / "configs").glob("*.yaml")))
def test_every_example_config_validates(path):
    assert load_job(path).output.dir.endswith(f"runs/{path.stem}")  # each example writes its own run


def test_every_example_pipeline_validates():
    from launch.pipeline import load_pipeline

    for path in (Path(__file__).parent.parent / "examples" / "pipelines").glob("*.yaml"):
        assert load_pipeline(path)[-1].stage == "ppo"


def test_qlora_policy_under_zero3_is_refused_for_ppo(tmp_path):
    text = GOOD.replace("stage: sft", "stage: ppo").replace("format: messages", "format: prompt")
    path = write(tmp_path, text + "peft:\n  method: qlora\nppo:\n  roles:\n    policy:\n      zero_stage: 3\n")
    with pytest.raises(UserError, match="peft.method qlora cannot run under deepspeed.zero_stage 3"):
        load_job(path)
