"""Secrets in the environment never land in a run directory (job.yaml, metrics, logs, checkpoints, final/)."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from tests.conftest import EXAMPLES, SFT_JOB, job_dict

# fake values shaped like the real ones; RAY_AUTH_TOKEN is Ray's own business and is left alone
SECRETS = {
    "HF_TOKEN": "hf_FAKEtoken123456",
    "HUGGING_FACE_HUB_TOKEN": "hf_FAKEhubtoken654321",
    "WANDB_API_KEY": "FAKEwandbkey0123456789abcdef",
    "AWS_SECRET_ACCESS_KEY": "FAKEawsSecret/abc+123",
    "OPENAI_API_KEY": "sk-FAKEopenai98765",
}


def test_tokens_in_the_environment_stay_out_of_the_run(tmp_path):
    rows = (EXAMPLES / "data" / "last-word-train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "train.jsonl").write_text("".join(rows[:24]))
    (tmp_path / "eval.jsonl").write_text("".join(rows[24:32]))
    run_dir = tmp_path / "run"
    job = job_dict(
        SFT_JOB,
        run_dir,
        data={"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "eval_generations": 4},
        training={"max_steps": 2, "batch_size": 4, "logging_steps": 1},
        output={"save_steps": 1, "keep_last": 2},  # checkpoints too: trainer state, RNG, training_args.bin
        cluster={"workers": 1},
    )
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    env = {**os.environ, **SECRETS, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tuneyard.launch.cli", "train", str(tmp_path / "job.yaml"), "--single"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    names = {p.relative_to(run_dir).parts[0] for p in files}
    assert {"job.yaml", "metrics.jsonl", "run.json", "checkpoints", "final"} <= names, names
    assert any(p.name == "training_args.bin" for p in files)  # the checkpoints' pickle of the trainer's arguments
    for path in [*files, *(tmp_path / ".tokenized").rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            leaked = [name for name, value in SECRETS.items() if value.encode() in data]
            assert not leaked, f"{path} holds {leaked}"
    console = proc.stdout + proc.stderr
    assert not [name for name, value in SECRETS.items() if value in console]
