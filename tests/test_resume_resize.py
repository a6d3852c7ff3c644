"""A ZeRO checkpoint resumes on another number of workers: converted once to DeepSpeed's universal checkpoint
beside the original, and the run goes on with the losses of a run that never changed size.

The global batch is kept (2 workers x 4 rows = 1 worker x 8) and pretraining rows are full blocks (every rank
averages the same number of tokens), so the resumed losses equal the other run's, not merely come close.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.conftest import PRETRAIN_JOB, job_dict
from tests.ppo_jobs import iterations_of, ppo_job
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.run_job import run_job
from tuneyard.training.errors import UserError
from tuneyard.training.metrics import read_metrics
from tuneyard.training.universal_checkpoint import prepare_resize

pytestmark = pytest.mark.integration


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` and its sha256: the original save, to show the conversion leaves it as it was."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.pt")}


def pretrain(tmp_path: Path, name: str, zero_stage: int, workers: int, steps: int, resume: str = "auto") -> Path:
    job = job_dict(
        PRETRAIN_JOB,
        tmp_path / name,
        deepspeed={"zero_stage": zero_stage},
        cluster={"workers": workers},
        # a constant rate after warm-up: runs of another max_steps follow the same schedule
        training={"max_steps": steps, "batch_size": 8 // workers, "lr_scheduler": "constant_with_warmup"},
        output={"save_steps": 2, "resume": resume},
    )
    return run_job(job_from_dict(job), show_progress=False).run_dir


def resumed_from_2_workers_on_1(tmp_path: Path, zero_stage: int) -> tuple[Path, Path]:
    """A 2-worker run of 4 steps, and a 1-worker run from its checkpoint-2 to step 6; both run directories."""
    two = pretrain(tmp_path, "two", zero_stage, workers=2, steps=4)
    saved = two / "checkpoints" / "checkpoint-2"
    original = digests(saved / "global_step2")
    assert len([p for p in original if "optim_states" in p]) == 2  # split 2 ways
    one = pretrain(tmp_path, "one", zero_stage, workers=1, steps=6, resume=str(saved))
    assert digests(saved / "global_step2") == original  # the original is kept, byte for byte
    assert (saved / "latest_universal").read_text() == "global_step2_universal"
    assert not (saved / "universal.staging").exists()
    # measured (ZeRO-2 and ZeRO-3): 6.14265, 5.94629 after the resize; the 2-worker run's: 6.14265, 5.94629
    for step in (3, 4):
        assert losses(one)[step] == pytest.approx(losses(two)[step], rel=1e-5), step
    return two, one


def test_zero2_checkpoint_of_2_workers_resumes_on_1_but_not_in_one_process(ray_session, tmp_path):
    two, _ = resumed_from_2_workers_on_1(tmp_path, zero_stage=2)
    # what DeepSpeed's converter cannot read (here a save missing its model-states file) is one paragraph with its
    # reason; the checkpoint stays as it was and no staging folder is left
    broken = tmp_path / "broken"
    shutil.copytree(
        two / "checkpoints" / "checkpoint-2",
        broken,
        ignore=shutil.ignore_patterns("*universal*", "mp_rank_00_model_states.pt"),
    )
    with pytest.raises(UserError, match="DeepSpeed's ds_to_universal, .* could not convert it") as caught:
        prepare_resize(broken, 1, "cluster.workers", tmp_path / "convert.log")
    assert "Set cluster.workers: 2 to continue it" in str(caught.value)
    assert not (broken / "universal.staging").exists() and not (broken / "latest_universal").exists()
    # --single has no DeepSpeed to load the shards: refused before anything starts (a longer run of `two` resumes)
    job = job_dict(PRETRAIN_JOB, two, deepspeed={"zero_stage": 2}, cluster={"workers": 2})
    job["training"] |= {"max_steps": 6, "batch_size": 4, "lr_scheduler": "constant_with_warmup"}
    job["output"] |= {"save_steps": 2}
    with pytest.raises(UserError, match="written by 2 workers under DeepSpeed ZeRO") as caught:
        run_job(job_from_dict(job), show_progress=False, single=True)
    assert "drop --single" in str(caught.value)


def test_zero3_checkpoint_resumes_from_2_workers_on_1_and_from_1_on_2(ray_session, tmp_path):
    """ZeRO-3 splits the weights too. DeepSpeed's universal load shares one Adam step counter between the optimizer's
    groups, which tuneyard splits again: else the bias correction ran two steps a step (5.7959 at step 5, not 5.788)."""
    _, one = resumed_from_2_workers_on_1(tmp_path, zero_stage=3)
    back = pretrain(tmp_path, "back", 3, workers=2, steps=6, resume=str(one / "checkpoints" / "checkpoint-4"))
    # measured: 5.78796, 5.65212 at steps 5 and 6 on either side of the resize (and in a 6-step run never resized)
    for step in (5, 6):
        assert losses(back)[step] == pytest.approx(losses(one)[step], rel=1e-5), step
    assert sorted(losses(back)) == [5, 6] and losses(one)[6] < losses(one)[3] - 0.4  # it went on learning


def test_ppo_policy_and_critic_resume_on_other_worker_counts(ray_session, sft_base, tmp_path):
    """Policy 2 -> 1 and critic 1 -> 2 workers in one resume; greedy rollouts, so both runs sample the same."""

    def job(name: str, policy: int, critic: int, resume: str = "auto") -> dict:
        roles = {
            "policy": {"workers": policy, "cpus_per_worker": 0.5},
            "critic": {"workers": critic, "cpus_per_worker": 0.5},
        }
        ppo = {"iterations": 2, "save_every": 1, "generation": {"temperature": 0.0}, "roles": roles}
        return job_from_dict(ppo_job(tmp_path, sft_base, name, ppo=ppo, output={"resume": resume}))

    first = run_job(job("first", policy=2, critic=1), show_progress=False).run_dir
    resumed = run_job(
        job("resumed", policy=1, critic=2, resume=str(first / "checkpoints" / "checkpoint-1")), show_progress=False
    ).run_dir
    checkpoint = first / "checkpoints" / "checkpoint-1"
    assert (checkpoint / "policy" / "latest_universal").is_file() and (
        checkpoint / "critic" / "latest_universal"
    ).is_file()
    want, got = iterations_of(first)[1], iterations_of(resumed)[0]
    assert got["step"] == want["step"] == 2
    for key in ("reward", "kl", "policy_loss", "value_loss", "first_policy_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
