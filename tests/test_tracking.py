"""Experiment tracking (training.report_to): TensorBoard, W&B (offline) and MLflow (a local store) hold the figures
of metrics.jsonl and the job; credentials never land in the run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES, PRETRAIN_JOB, SFT_JOB, job_dict
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.preflight import preflight
from tuneyard.training.config import TrainingConfig
from tuneyard.training.errors import UserError
from tuneyard.training.metrics import read_metrics
from tuneyard.training.tracking import Trackers, check_trackers, tracker_env

# unique fake credentials, set in the run's environment (the CLI's local Ray hands them to its workers)
SECRETS = {
    "WANDB_API_KEY": "FAKEwandbKEY0tracking0c0ffee5e1b9c",
    "MLFLOW_TRACKING_PASSWORD": "FAKEmlflowPW0tracking077d2",
    "MLFLOW_TRACKING_TOKEN": "FAKEmlflowTOKEN0tracking0a1b",
}
ALL_TRACKERS = ["tensorboard", "wandb", "mlflow"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One `tuneyard train` (2 Ray workers, 4 SFT steps, evaluations at 0, 2, 4) with all three trackers."""
    tmp = tmp_path_factory.mktemp("tracking")
    rows = (EXAMPLES / "data" / "last-word-train.jsonl").read_text().splitlines(keepends=True)
    (tmp / "train.jsonl").write_text("".join(rows[:32]))
    (tmp / "eval.jsonl").write_text("".join(rows[32:40]))
    run_dir = tmp / "run"
    job = job_dict(
        SFT_JOB,
        run_dir,
        data={"train": str(tmp / "train.jsonl"), "eval": str(tmp / "eval.jsonl")},
        training={"max_steps": 4, "eval_steps": 2, "logging_steps": 1, "report_to": ALL_TRACKERS},
    )
    (tmp / "job.yaml").write_text(yaml.safe_dump(job))
    env = {
        **os.environ,
        **SECRETS,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        # Ray's session folder: a short path, as its socket paths are limited to 107 characters
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="ty-ray-"),
    }
    for name in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)  # the run's defaults are under test
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tuneyard.launch.cli", "train", str(tmp / "job.yaml")],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp,
            env=env,
        )
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def figures_of(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in a run's metrics.jsonl, in order."""
    return [(r["step"], r[key]) for r in read_metrics(run_dir / "metrics.jsonl") if key in r and "event" not in r]


def wandb_records(path: Path):
    """The protobuf records of a .wandb file (W&B's LevelDB-style log; wandb >= 0.2x ships no reader of its own)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record, MIDDLE/LAST add
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


@pytest.mark.integration
def test_tensorboard_events_hold_the_losses_of_metrics_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tracked_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss"), ("train/grad_norm", "grad_norm")):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = figures_of(run_dir, key)
        assert [s for s, _ in got] == [s for s, _ in expected] and len(expected) >= 3, (tag, got, expected)
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), tag  # float32 events
    text = events.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text)["training"]["report_to"] == ALL_TRACKERS  # the resolved job as the run's config


@pytest.mark.integration
def test_wandb_offline_run_holds_the_losses_and_the_job(tracked_run):
    run_dir, _ = tracked_run
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs  # WANDB_DIR defaults to the run directory; rank 0 alone opened a run
    history, config = [], {}
    for record in wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            # "train/loss" arrives as the nested key ("train", "loss")
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":
            assert (record.run.project, record.run.display_name) == ("tuneyard", run_dir.name)
    losses = [(h["train/global_step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert losses == figures_of(run_dir, "loss")
    evals = [(h["train/global_step"], h["eval/loss"]) for h in history if "eval/loss" in h]
    assert evals == figures_of(run_dir, "eval_loss")
    assert config["training"]["learning_rate"] == 3e-3 and config["stage"] == "sft"


@pytest.mark.integration
def test_mlflow_store_holds_the_metrics_and_the_job_as_params(tracked_run):
    from mlflow import MlflowClient

    run_dir, _ = tracked_run
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tuneyard")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    for key in ("loss", "eval_loss", "lr"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == figures_of(run_dir, key), key
    params = run.data.params
    assert params["stage"] == "sft" and float(params["training.learning_rate"]) == 3e-3
    assert params["data.max_length"] == "128" and params["cluster.workers"] == "2"


@pytest.mark.integration
def test_tracker_credentials_never_land_in_the_run(tracked_run):
    run_dir, proc = tracked_run
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.parts[-2] == "logs" for p in files) and (run_dir / "mlflow.db").exists()
    for path in files:
        data = path.read_bytes()
        leaked = [name for name, value in SECRETS.items() if value.encode() in data]
        assert not leaked, f"{path} holds {leaked}"
    assert not [name for name, value in SECRETS.items() if value in proc.stdout + proc.stderr]


def test_worker_settings_leave_credentials_behind(monkeypatch):
    """Settings travel to workers as Ray task arguments, which Ray's dashboard can show: credentials stay behind."""
    for name in list(os.environ):
        if name.startswith(("WANDB_", "MLFLOW_", "TENSORBOARD_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    monkeypatch.setenv("WANDB_API_KEY", SECRETS["WANDB_API_KEY"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRETS["MLFLOW_TRACKING_PASSWORD"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:pw@mlflow.example:5000")
    assert tracker_env() == {"WANDB_MODE": "offline", "MLFLOW_EXPERIMENT_NAME": "mine"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracker_env()["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


def test_a_requested_tracker_without_its_package_is_one_paragraph_at_preflight(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # Python's own way to make a module unimportable
    job = job_dict(PRETRAIN_JOB, tmp_path / "run", training={"report_to": ["tensorboard", "wandb"]})
    with pytest.raises(UserError) as err:
        preflight(job_from_dict(job))
    message = str(err.value)
    assert "training.report_to lists wandb" in message and 'pip install "tuneyard[tracking]"' in message
    assert "\n" not in message


def test_default_tensorboard_without_a_package_is_skipped_with_a_line(monkeypatch, tmp_path, caplog):
    for name in ("tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, name, None)
    check_trackers(TrainingConfig())  # left default: the run goes on without it
    with pytest.raises(UserError, match="training.report_to lists tensorboard"):
        check_trackers(TrainingConfig(report_to=["tensorboard"]))  # asked for: refused
    with caplog.at_level(logging.INFO, logger="tuneyard.training.tracking"):
        trackers = Trackers(TrainingConfig().report_to, tmp_path)
        trackers.start()
        trackers.log({"step": 1, "loss": 1.0})
        trackers.finish()
    assert trackers.names == [] and not (tmp_path / "tensorboard").exists()
    assert "tensorboard skipped" in caplog.text


def test_a_failed_run_ends_its_tracker_runs_marked_failed(monkeypatch, tmp_path):
    """Training stops on NaN losses (a TrainingFailed raised inside the trainer): MLflow's run ends FAILED, not open."""
    from mlflow.tracking import MlflowClient

    from tuneyard.launch.run_job import run_job
    from tuneyard.training.errors import TrainingFailed

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TUNEYARD_FAULT_NAN_LOSS", "1,2,3,4,5,6")
    run_dir = tmp_path / "run"
    job = job_dict(
        PRETRAIN_JOB, run_dir, training={"report_to": ["mlflow"], "max_nonfinite_steps": 2}, cluster={"workers": 1}
    )
    with pytest.raises(TrainingFailed):
        run_job(job_from_dict(job), show_progress=False, single=True)
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tuneyard").experiment_id])
    assert run.info.status == "FAILED"
