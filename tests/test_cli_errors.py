"""Bad input through the `tuneyard` command: one clear paragraph on stderr, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import SFT_JOB, job_dict


def run_cli(tmp_path, job: dict, *overrides: str) -> subprocess.CompletedProcess:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return subprocess.run(
        [sys.executable, "-m", "tuneyard.launch.cli", "train", str(path), *overrides],
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_unknown_config_key(tmp_path):
    job = job_dict(SFT_JOB, tmp_path / "run")
    job["training"]["lerning_rate"] = 1
    assert_user_error(run_cli(tmp_path, job), "unknown key 'training.lerning_rate'; did you mean 'learning_rate'?")


def test_model_path_that_does_not_exist(tmp_path):
    job = job_dict(SFT_JOB, tmp_path / "run")
    job["model"] = {"name_or_path": str(tmp_path / "no-such-model")}
    assert_user_error(run_cli(tmp_path, job), f"model.name_or_path: '{tmp_path / 'no-such-model'}' does not exist")


def test_malformed_jsonl(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", ['{"messages": []}', "{not json"])
    job = job_dict(SFT_JOB, tmp_path / "run", data={"train": data, "eval": None})
    assert_user_error(run_cli(tmp_path, job), f"{data}:2: malformed JSON")


def test_row_missing_a_field(tmp_path):
    data = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "hi", "output": "yo"}, {"instruction": "x"}])
    job = job_dict(SFT_JOB, tmp_path / "run", data={"format": "alpaca", "train": data, "eval": None})
    assert_user_error(run_cli(tmp_path, job), f"{data}:2: row is missing field 'output'; its columns are 'instruction'")


def test_empty_dataset(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    job = job_dict(SFT_JOB, tmp_path / "run", data={"train": str(data), "eval": None})
    assert_user_error(run_cli(tmp_path, job), "data.train: no rows left after reading")


@pytest.mark.parametrize("setting", [None, "output.overwrite=true"])
def test_output_dir_of_another_job(tmp_path, setting):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"identity": "someone-else"}))
    job = job_dict(SFT_JOB, run)
    job["model"] = {"name_or_path": str(tmp_path / "missing")}  # stops right after the output-dir check
    proc = run_cli(tmp_path, job, *([setting] if setting else []))
    if setting is None:
        assert_user_error(proc, "holds another job's run", "output.overwrite: true")
    else:  # allowed past the run-dir check; fails later, on the model path
        assert_user_error(proc, "does not exist")


def test_workers_the_cluster_cannot_host(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("asks for a GPU a machine without one lacks")
    job = job_dict(SFT_JOB, tmp_path / "run", cluster={"workers": 2, "gpus_per_worker": 1})
    started = time.monotonic()
    proc = run_cli(tmp_path, job)
    assert time.monotonic() - started < 60, "refused only after a minute"
    assert_user_error(
        proc,
        "cluster.workers 2 x cluster.gpus_per_worker 1 = 2 GPUs, but the Ray cluster has 0 GPUs (1 node: 0)",
        "set cluster.gpus_per_worker: 0 to train on CPUs",
    )


def test_a_section_given_twice(tmp_path):
    path = tmp_path / "job.yaml"
    text = yaml.safe_dump(job_dict(SFT_JOB, tmp_path / "run"), sort_keys=False)
    path.write_text(text + "training:\n  max_steps: 1\n")
    first = text.splitlines().index("training:") + 1
    second = len(text.splitlines()) + 1
    proc = subprocess.run(
        [sys.executable, "-m", "tuneyard.launch.cli", "train", str(path)], capture_output=True, text=True, timeout=120
    )
    assert_user_error(proc, f"{path}:{first} and {path}:{second}: 'training' is given twice; keep one")


def test_a_time_limit_sbatch_does_not_take(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict(SFT_JOB, tmp_path / "run")))
    command = ["submit", str(path), "--slurm", "--nodes", "1", "--time", "forever", "--dry-run"]
    proc = subprocess.run(
        [sys.executable, "-m", "tuneyard.launch.cli", *command], capture_output=True, text=True, timeout=120
    )
    assert_user_error(proc, "--time 'forever' is not a time limit sbatch accepts", "hours:minutes:seconds")
    assert proc.stdout == ""  # refused before the script is rendered
