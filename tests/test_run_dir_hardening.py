"""The run directory's edges: a rerun of a finished run, a longer rerun, an output.dir that cannot be created;
and which worker failures are retried (a lost worker) or not (an error the training code raised)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import PRETRAIN_JOB, job_dict
from tuneyard.launch.config import job_from_dict
from tuneyard.training.errors import UserError
from tuneyard.training.metrics import read_metrics
from tuneyard.training.run_dir import (
    complete_checkpoints,
    finished_run,
    job_identity,
    prepare_run_dir,
    read_outcome,
    run_lineage,
)


def test_an_output_dir_that_cannot_be_created_is_one_paragraph():
    out = job_from_dict(job_dict(PRETRAIN_JOB, Path("/proc/tuneyard-test/run"))).output
    with pytest.raises(UserError) as info:
        prepare_run_dir(out, "job-a")
    message = str(info.value)
    assert message.startswith("output.dir '/proc/tuneyard-test/run' cannot be created: ")
    assert "No such file or directory" in message and "choose an output.dir" in message and "\n" not in message


def test_the_length_of_a_job_changes_its_identity_but_not_its_lineage(tmp_path):
    def dumps(**training) -> dict:
        return job_from_dict(job_dict(PRETRAIN_JOB, tmp_path / "run", training=training)).identity_dump()

    base, longer, other = dumps(), dumps(max_steps=60, epochs=3), dumps(learning_rate=1e-4)
    assert job_identity(base) != job_identity(longer) and run_lineage(base) == run_lineage(longer)
    assert run_lineage(base) != run_lineage(other)


def test_a_rerun_of_a_finished_run_trains_nothing_and_a_longer_one_resumes(tmp_path):
    """3 steps --single; the same job again returns at once (metrics and outcome untouched) and says so; with
    training.max_steps 5 it resumes from checkpoint-3 and trains steps 4 and 5; overwrite starts again."""
    from tuneyard.launch.run_job import run_job

    run_dir = tmp_path / "run"
    job = job_dict(PRETRAIN_JOB, run_dir, training={"max_steps": 3}, output={"save_steps": 3})
    run_job(job_from_dict(job), show_progress=False, single=True)
    metrics, outcome = (run_dir / "metrics.jsonl").read_text(), read_outcome(run_dir)
    assert outcome["status"] == "finished"

    again = run_job(job_from_dict(job), show_progress=False, single=True)
    assert (run_dir / "metrics.jsonl").read_text() == metrics and read_outcome(run_dir) == outcome
    assert "holds this job's finished run; nothing to train" in again.figure()
    assert str(run_dir.resolve() / "final") in again.figure() and "training.max_steps" in again.figure()

    job["training"]["max_steps"] = 5
    run_job(job_from_dict(job), show_progress=False, single=True)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "start"] == [0, 3]
    assert max(r["step"] for r in records if "loss" in r) == 5
    assert read_outcome(run_dir)["status"] == "finished"
    assert json.loads((run_dir / "run.json").read_text())["identity"] == job_identity(
        job_from_dict(job).identity_dump()
    )
    overwrite = job_from_dict({**job, "output": {**job["output"], "overwrite": True}}).output
    assert finished_run(overwrite, job_identity(job_from_dict(job).identity_dump())) is None


def test_a_longer_rerun_without_a_checkpoint_is_refused_with_the_way_on(tmp_path):
    run_dir = tmp_path / "run"
    short = job_from_dict(job_dict(PRETRAIN_JOB, run_dir, training={"max_steps": 3}))
    longer = job_from_dict(job_dict(PRETRAIN_JOB, run_dir, training={"max_steps": 9}))
    prepare_run_dir(short.output, job_identity(short.identity_dump()), run_lineage(short.identity_dump()))
    (run_dir / "final").mkdir()
    assert not complete_checkpoints(run_dir)
    with pytest.raises(UserError, match="no checkpoint to continue it from"):
        prepare_run_dir(longer.output, job_identity(longer.identity_dump()), run_lineage(longer.identity_dump()))


def failed(**ranks: BaseException) -> Exception:
    from tuneyard.cluster.worker_group import WorkersFailed

    return WorkersFailed({int(rank.removeprefix("r")): error for rank, error in ranks.items()})


def test_only_errors_the_training_code_raised_are_not_retried():
    import torch
    from ray.exceptions import ActorDiedError

    from tuneyard.launch.failures import raised_by_training

    closed = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242")
    assert raised_by_training(failed(r0=ValueError("injected"), r1=ValueError("injected")))
    assert raised_by_training(failed(r0=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")))
    assert raised_by_training(failed(r0=ValueError("bad row"), r1=closed))  # the peer lost rank 0 to its error
    assert not raised_by_training(failed(r0=ActorDiedError(), r1=closed))  # a lost worker: restart
    assert not raised_by_training(failed(r0=ActorDiedError(), r1=ValueError("after the partner went")))
    assert not raised_by_training(failed(r0=RuntimeError("Timed out waiting 20000ms for recv")))  # a stall
    assert not raised_by_training(RuntimeError("no worker_failures"))


def test_the_usable_length_counts_a_stretching_rope():
    from transformers import AutoConfig

    from tuneyard.launch.preflight import usable_length

    assert usable_length(AutoConfig.for_model("llama", max_position_embeddings=256)) == 256
    linear = {"rope_type": "linear", "factor": 4.0}
    assert usable_length(AutoConfig.for_model("llama", max_position_embeddings=256, rope_scaling=linear)) == 1024


def test_overwrite_starts_again_but_keeps_the_slurm_output_that_is_being_written(tmp_path):
    from tuneyard.training.config import OutputConfig
    from tuneyard.training.run_dir import prepare_run_dir

    run_dir = tmp_path / "run"
    prepare_run_dir(OutputConfig(dir=str(run_dir)), "old")
    (run_dir / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    (run_dir / "logs" / "worker-0.log").write_text("old run")
    (run_dir / "logs" / "slurm-7.out").write_text("the job that is running now")
    prepare_run_dir(OutputConfig(dir=str(run_dir), overwrite=True), "new")
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == [
        "logs",
        "logs/slurm-7.out",
        "run.json",
    ]
    assert (run_dir / "logs" / "slurm-7.out").read_text() == "the job that is running now"
