"""Real Ray workers + DeepSpeed ZeRO + TRL on tiny models, 2 CPU workers over gloo, one shared Ray."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import PRETRAIN_JOB, SFT_JOB, job_dict
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.run_job import run_job
from tuneyard.training.errors import UserError
from tuneyard.training.metrics import read_metrics
from tuneyard.training.run_dir import complete_checkpoints

pytestmark = pytest.mark.integration


def losses(run_dir) -> dict[int, float]:
    """step -> training loss, the last record winning (a resumed run appends)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def pretrain_run(ray_session, tmp_path_factory):
    """30 steps of ZeRO-3 pretraining on 2 workers, checkpoints at 15 and 30."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    job = job_from_dict(
        job_dict(PRETRAIN_JOB, run_dir, training={"max_steps": 30, "eval_steps": 15}, output={"save_steps": 15})
    )
    return job, run_job(job, show_progress=False)


def test_zero3_pretraining_lowers_eval_loss(pretrain_run):
    _, result = pretrain_run
    assert result.eval_loss_before - result.eval_loss_after > 1.5, result.figure()
    records = read_metrics(result.run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert {"lr", "grad_norm", "tokens_per_s", "samples_per_s"} <= set(steps[-1])
    assert (result.run_dir / "final" / "model.safetensors").exists()
    assert not list((result.run_dir / "final").glob("*.bin"))  # safetensors only, no pickles


def test_final_folder_reloads_to_the_trained_weights(pretrain_run):
    """final/ (gathered from ZeRO-3 shards) gives the logits of the last DeepSpeed checkpoint's fp32 weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _, result = pretrain_run
    reloaded = AutoModelForCausalLM.from_pretrained(result.run_dir / "final").eval()
    trained = AutoModelForCausalLM.from_pretrained(result.run_dir / "final").eval()
    state = get_fp32_state_dict_from_zero_checkpoint(str(result.run_dir / "checkpoints" / "checkpoint-30"))
    missing, unexpected = trained.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    ids = torch.randint(0, reloaded.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained(ids).logits, atol=0, rtol=0)


def test_resume_continues_to_the_same_loss(pretrain_run, tmp_path):
    """15 steps + resume to 30 ends at the loss of 30 steps straight."""
    job, straight = pretrain_run
    copy = tmp_path / "resumed"
    shutil.copytree(straight.run_dir, copy, ignore=shutil.ignore_patterns("checkpoint-30", "final", "ray"))
    (copy / "metrics.jsonl").write_text("")  # the resumed run's records alone
    resumed_job = job.model_copy(update={"output": job.output.model_copy(update={"dir": str(copy)})})
    run_job(resumed_job, show_progress=False)
    resumed = losses(copy)
    assert min(resumed) == 16  # it continued from checkpoint-15, not from scratch
    reference = losses(straight.run_dir)
    for step in (16, 23, 30):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("start", ["pretrained", "scratch"])
def test_zero_stages_give_the_same_first_losses(pretrain_run, tmp_path, start):
    """Same seed and data: ZeRO-0, ZeRO-2 and ZeRO-3 on 2 workers agree on the first steps.

    "pretrained" loads the pretrain run's final/ (under zero.Init for ZeRO-3); "scratch" builds anew.
    """
    _, pretrained = pretrain_run
    model = {"init": "pretrained", "name_or_path": str(pretrained.run_dir / "final")} if start == "pretrained" else {}
    stages = (0, 2, 3) if start == "pretrained" else (0, 3)
    curves = {}
    for stage in stages:
        run_dir = tmp_path / f"zero{stage}"
        job = job_dict(PRETRAIN_JOB, run_dir, training={"max_steps": 4}, deepspeed={"zero_stage": stage})
        if model:
            job["model"] = model
        run_job(job_from_dict(job), show_progress=False)
        curves[stage] = [losses(run_dir)[s] for s in range(1, 5)]
    assert len(set(curves[0])) == 4  # the weights moved every step
    for stage in stages[1:]:
        assert curves[stage] == pytest.approx(curves[0], rel=2e-5), curves


def test_sft_on_two_workers_learns_the_assistant_turns(ray_session, tmp_path):
    run_dir = tmp_path / "sft"
    job = job_from_dict(job_dict(SFT_JOB, run_dir, training={"max_steps": 25, "learning_rate": 5e-3}))
    result = run_job(job, show_progress=False)
    assert result.eval_loss_after < result.eval_loss_before * 0.5, result.figure()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.config.num_hidden_layers == 2
    # the driver tokenised into a fresh cache before the workers' process group existed: rank 0 only read it
    assert "tokenised data: warm cache" in (run_dir / "logs" / "worker-0.log").read_text()


def test_overlength_error_comes_before_any_worker_starts(ray_session, tmp_path):
    run_dir = tmp_path / "long"
    job = job_from_dict(job_dict(SFT_JOB, run_dir, data={"max_length": 16}))
    with pytest.raises(UserError, match=r"train examples are longer than data.max_length=16 tokens"):
        run_job(job, show_progress=False)
    assert not list((run_dir / "logs").glob("worker-*"))  # found while the driver tokenised: no worker started


def kill_worker_after_checkpoint(run_dir, rank: int, after_step: int) -> dict:
    """In the background: once a checkpoint is complete and step `after_step` logged, SIGKILL worker `rank`."""
    done: dict = {"pid": None}

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and done["pid"] is None:
            log = run_dir / "logs" / f"worker-{rank}.log"
            if complete_checkpoints(run_dir) and max(losses(run_dir), default=0) >= after_step and log.exists():
                pid = int([x for x in log.read_text().splitlines() if "(pid " in x][-1].split("(pid ")[1].split(")")[0])
                os.kill(pid, signal.SIGKILL)
                done["pid"] = pid
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return done


def test_a_killed_worker_restarts_from_the_last_checkpoint_and_ends_at_the_same_loss(pretrain_run, tmp_path):
    """SIGKILL of rank 1 after checkpoint-15 (training.max_failures 2): the run finishes by itself."""
    job, straight = pretrain_run
    run_dir = tmp_path / "killed"
    killed_job = job.model_copy(update={"output": job.output.model_copy(update={"dir": str(run_dir)})})
    killed = kill_worker_after_checkpoint(run_dir, rank=1, after_step=16)
    run_job(killed_job, show_progress=False)
    assert killed["pid"] is not None
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "start"] == [0, 15]  # restarted from checkpoint-15
    assert "rank 1" in [r for r in records if r.get("event") == "restart"][0]["reason"]
    reference, got = losses(straight.run_dir), losses(run_dir)
    for step in (16, 23, 30):
        assert got[step] == pytest.approx(reference[step], rel=1e-4), step
    assert (run_dir / "final" / "model.safetensors").exists()


def test_a_killed_worker_without_retries_is_one_paragraph(ray_session, tmp_path):
    """max_failures 0: the CLI says which rank failed, how, and where its log is; exit 1, no traceback."""
    import yaml

    run_dir = tmp_path / "run"
    job = job_dict(PRETRAIN_JOB, run_dir, training={"max_steps": 60, "max_failures": 0}, output={"save_steps": 5})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    killed = kill_worker_after_checkpoint(run_dir, rank=1, after_step=6)
    proc = subprocess.run(
        [sys.executable, "-m", "tuneyard.launch.cli", "train", str(tmp_path / "job.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed["pid"] is not None
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("training failed: rank 1") and "worker-1.log" in message, message
    assert "training.max_failures" in message


def test_resume_of_2_workers_in_one_process_is_refused_with_the_way_on(pretrain_run, tmp_path):
    """--single has no DeepSpeed to load a 2-worker ZeRO checkpoint: refused before anything starts. On Ray any
    cluster.workers resumes it (its universal copy: tests/test_resume_resize.py); 2 -> 2 resumes (the test above)."""
    job, straight = pretrain_run
    copy = tmp_path / "run"
    shutil.copytree(straight.run_dir, copy, ignore=shutil.ignore_patterns("checkpoint-30", "final", "ray", "logs"))
    one = job.model_copy(update={"output": job.output.model_copy(update={"dir": str(copy)})})
    with pytest.raises(UserError, match="written by 2 workers under DeepSpeed ZeRO") as info:
        run_job(one, show_progress=False, single=True)
    assert "drop --single" in str(info.value)
    assert not list((copy / "logs").iterdir())  # nothing started
