"""Faults injected into real runs (Ray workers, DeepSpeed, gloo): NaN losses, kills inside a save, a full disk.

The faults are switched on by TUNEYARD_FAULT_* variables (training/faults.py), which the driver
forwards to its workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import PRETRAIN_JOB, ROOT, SFT_JOB, can_mount_tmpfs, job_dict, processes_of_session
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.run_job import run_job
from tuneyard.training.metrics import COMPLETE_MARKER, read_metrics
from tuneyard.training.nonfinite import NonFiniteTraining
from tuneyard.training.run_dir import complete_checkpoints

pytestmark = pytest.mark.integration


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, the last record winning (a resumed run appends)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def zero_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a DeepSpeed ZeRO checkpoint, gathered from its shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_with_fault(tmp_path: Path, job: dict, **faults: str) -> tuple[subprocess.CompletedProcess, str]:
    """`tuneyard train` on `job` with TUNEYARD_FAULT_<NAME> set; its outcome and the last stderr line."""
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    env = {**os.environ, **{f"TUNEYARD_FAULT_{name}": value for name, value in faults.items()}}
    proc = subprocess.run(
        [sys.executable, "-m", "tuneyard.launch.cli", "train", str(tmp_path / "job.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    lines = proc.stderr.strip().splitlines()
    return proc, lines[-1] if lines else ""


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(ray_session, tmp_path, monkeypatch, zero_stage):
    """Rank 0's loss is NaN at step 3: no rank moves its weights at step 3, then training goes on."""
    monkeypatch.setenv("TUNEYARD_FAULT_NAN_LOSS", "3")
    run_dir = tmp_path / "run"
    job = job_dict(
        SFT_JOB,
        run_dir,
        training={"max_steps": 4},
        deepspeed={"zero_stage": zero_stage},
        output={"save_steps": 1, "keep_last": 4},
    )
    run_job(job_from_dict(job), show_progress=False)
    folders = {step: run_dir / "checkpoints" / f"checkpoint-{step}" for step in (2, 3, 4)}
    if zero_stage == 0:
        states = {
            step: folder / f"global_step{step}" / "mp_rank_00_model_states.pt" for step, folder in folders.items()
        }
        weights = {step: torch.load(path, weights_only=False)["module"] for step, path in states.items()}
    else:
        weights = {step: zero_weights(folder) for step, folder in folders.items()}
    assert same(weights[2], weights[3])  # step 3 was skipped
    assert not same(weights[3], weights[4])  # step 4 trained
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "nonfinite"] == [3]
    assert sorted(losses(run_dir)) == [1, 2, 4]  # the skipped step has no loss, the others a finite one
    assert (run_dir / "final" / "model.safetensors").exists()


def test_a_run_of_nan_steps_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Steps 5-8 NaN with training.max_nonfinite_steps 2: stop at step 7, naming it; checkpoint-4 reloads."""
    monkeypatch.setenv("TUNEYARD_FAULT_NAN_LOSS", "5,6,7,8")
    run_dir = tmp_path / "run"
    job = job_dict(
        PRETRAIN_JOB, run_dir, training={"max_steps": 10, "max_nonfinite_steps": 2}, output={"save_steps": 4}
    )
    with pytest.raises(NonFiniteTraining) as info:
        run_job(job_from_dict(job), show_progress=False, single=True)
    message = str(info.value)
    assert message.startswith("training stopped at step 7: the loss or gradients were NaN/inf for 3 steps in a row")
    assert "(steps 5-7)" in message and "weights are still those after step 4" in message
    assert "checkpoint-4" in message and "training.max_nonfinite_steps: 2" in message
    assert [p.name for p in complete_checkpoints(run_dir)] == ["checkpoint-4"]
    assert not (run_dir / "final").exists()
    weights = load_file(run_dir / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    # a rerun without the fault resumes from checkpoint-4 and finishes
    monkeypatch.delenv("TUNEYARD_FAULT_NAN_LOSS")
    run_job(job_from_dict(job), show_progress=False, single=True)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "start"] == [0, 4]
    assert (run_dir / "final" / "model.safetensors").exists()


def test_nan_stop_through_the_cli_is_one_paragraph_and_not_retried(ray_session, tmp_path):
    """On Ray with retries left: the NaN stop is reported at once (a retry would meet the same NaNs), exit 1."""
    run_dir = tmp_path / "run"
    job = job_dict(SFT_JOB, run_dir, training={"max_steps": 8, "max_nonfinite_steps": 0, "max_failures": 2})
    proc, message = train_with_fault(tmp_path, job, NAN_LOSS="2")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert message.startswith("training stopped at step 2: the loss or gradients were NaN/inf for 1 step in a row"), (
        message
    )
    assert not [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "restart"]


def kill_when_paused(run_dir: Path, point: str, step: int) -> dict:
    """In the background: when rank 0 pauses at `point` of checkpoint-`step`'s save, SIGKILL it there."""
    done: dict = {"pid": None, "checkpoints": None}
    marker = run_dir / "faults" / f"paused-{point}-{step}"

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if marker.exists() and marker.read_text():
                done["checkpoints"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
                done["pid"] = int(marker.read_text())
                os.kill(done["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return done


SAVE_EVERY_10 = {"training": {"max_steps": 24, "max_failures": 1}, "output": {"save_steps": 10, "keep_last": 1}}


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory) -> dict[int, float]:
    """The losses of the kill-in-save runs' job when nothing is killed."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_job(job_from_dict(job_dict(PRETRAIN_JOB, run_dir, **SAVE_EVERY_10)), show_progress=False)
    return losses(run_dir)


@pytest.mark.parametrize(
    "point,restart_from",
    [("weights", 10), ("written", 10), ("marked", 20)],
)
def test_a_kill_inside_a_save_leaves_a_complete_checkpoint_to_resume(
    uninterrupted, tmp_path, monkeypatch, point, restart_from
):
    """keep_last 1, checkpoints every 10 steps: rank 0 is killed inside the save of checkpoint-20.

    Killed after the weights but before the optimizer state, or after every file but before the
    mark, the run restarts from checkpoint-10 (still there); killed after the mark but before the
    old one is retired, from checkpoint-20. Each ends at the loss of a run never killed.
    """
    monkeypatch.setenv("TUNEYARD_FAULT_PAUSE", f"{point}@20")
    run_dir = tmp_path / "run"
    killed = kill_when_paused(run_dir, point, 20)
    run_job(job_from_dict(job_dict(PRETRAIN_JOB, run_dir, **SAVE_EVERY_10)), show_progress=False)
    assert killed["pid"] is not None
    assert "checkpoint-10" in killed["checkpoints"]  # keep_last 1 did not delete it before checkpoint-20 was complete
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "start"] == [0, restart_from]
    got = losses(run_dir)
    for step in (21, 24):
        assert got[step] == pytest.approx(uninterrupted[step], rel=1e-4), step
    assert [p.name for p in complete_checkpoints(run_dir)] == ["checkpoint-24"]


def test_a_kill_of_the_driver_inside_a_save_leaves_a_complete_checkpoint_to_resume(uninterrupted, tmp_path):
    """SIGKILL of `tuneyard train` itself while rank 0 is inside the save of checkpoint-20 (every file
    written, not yet marked): Ray's daemons and the workers go with it, checkpoint-10 is still the newest
    complete one, and the same command resumes from it and ends at the loss of a run never killed.

    Ray's two agents outlive the driver by about a minute (they report the raylet's death to a GCS
    that is gone and wait for that call to time out); the rerun runs meanwhile, and they are gone after.
    """
    run_dir = tmp_path / "run"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_dict(PRETRAIN_JOB, run_dir, **SAVE_EVERY_10)))
    command = [sys.executable, "-m", "tuneyard.launch.cli", "train", str(tmp_path / "job.yaml")]
    env = {**os.environ, "TUNEYARD_FAULT_PAUSE": "written@20"}
    driver = subprocess.Popen(
        command, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        marker = run_dir / "faults" / "paused-written-20"
        deadline = time.monotonic() + 600
        while not (marker.exists() and marker.read_text()) and driver.poll() is None:
            assert time.monotonic() < deadline, "rank 0 never paused in the save of checkpoint-20"
            time.sleep(0.05)
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        assert any("raylet" in row for row in processes_of_session(driver.pid))  # the checks below can see Ray
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 30
        while not all("Agent" in row for row in processes_of_session(driver.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = processes_of_session(driver.pid)
        assert all("Agent" in row for row in left), left  # raylet, gcs and both workers went with the driver
        assert [p.name for p in complete_checkpoints(run_dir)] == ["checkpoint-10"]
        assert (run_dir / "checkpoints" / "checkpoint-20").is_dir()  # written, never marked

        rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        deadline = time.monotonic() + 90
        while processes_of_session(driver.pid) and time.monotonic() < deadline:
            time.sleep(1)
        assert not processes_of_session(driver.pid)
    finally:
        if processes_of_session(driver.pid):
            os.killpg(driver.pid, signal.SIGKILL)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "start"] == [0, 10]
    got = losses(run_dir)
    for step in (21, 24):
        assert got[step] == pytest.approx(uninterrupted[step], rel=1e-4), step
    assert [p.name for p in complete_checkpoints(run_dir)] == ["checkpoint-24"]


def test_a_full_disk_during_a_save_is_one_paragraph_and_the_previous_checkpoint_survives(tmp_path):
    """The run dir is on a 48 MiB tmpfs that fills after checkpoint-5: the save of checkpoint-10 fails.

    The CLI says so in one paragraph (exit 1, no retry), checkpoint-5 is intact, and once space is
    freed the same command resumes from it and finishes.
    """
    mount = tmp_path / "small"
    if not can_mount_tmpfs(mount):
        pytest.skip("needs unshare -m and tmpfs mounts (root)")
    run_dir = mount / "run"
    job = job_dict(PRETRAIN_JOB, run_dir, training={"max_steps": 15}, output={"save_steps": 5, "keep_last": 1})
    job["data"]["cache_dir"] = str(tmp_path / "tokenized")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    train = f"'{sys.executable}' -m tuneyard.launch.cli train '{tmp_path / 'job.yaml'}'"
    out = tmp_path / "out"
    out.mkdir()
    script = f"""
mount -t tmpfs -o size=48m tmpfs '{mount}'
( while [ ! -e '{run_dir}/checkpoints/checkpoint-5/{COMPLETE_MARKER}' ]; do sleep 0.05; done
  free=$(df --output=avail -B1 '{mount}' | tail -1)
  dd if=/dev/zero of='{mount}/filler' bs=64K count=$(( (free - 524288) / 65536 )) 2>/dev/null ) &
{train} > '{out}/first.out' 2> '{out}/first.err'; echo $? > '{out}/first.rc'
ls '{run_dir}/checkpoints' > '{out}/first.ls'
rm -f '{mount}/filler'
{train} > '{out}/second.out' 2> '{out}/second.err'; echo $? > '{out}/second.rc'
cp '{run_dir}/metrics.jsonl' '{out}/metrics.jsonl'
ls '{run_dir}/final' > '{out}/final.ls'
"""
    subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, timeout=900, check=True)
    first_err = (out / "first.err").read_text()
    assert (out / "first.rc").read_text().strip() == "1", first_err[-3000:]
    assert "Traceback" not in first_err
    message = first_err.strip().splitlines()[-1]
    assert message.startswith(f"saving checkpoint-10 failed: no space left on the disk of {run_dir}"), message
    assert f"The newest complete checkpoint, {run_dir / 'checkpoints' / 'checkpoint-5'}, is intact" in message
    left = [name for name in (out / "first.ls").read_text().split() if name.startswith("checkpoint-")]
    assert left == ["checkpoint-5"]  # the half-written one is gone
    assert (out / "second.rc").read_text().strip() == "0", (out / "second.err").read_text()[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert not [r for r in records if r.get("event") == "restart"]  # a full disk is not retried
    assert [r["step"] for r in records if r.get("event") == "start"] == [0, 5]
    assert "model.safetensors" in (out / "final.ls").read_text().split()


def test_a_collective_timeout_names_the_rank_that_did_not_arrive(ray_session, tmp_path):
    """Rank 1 is held back after step 3 and cluster.collective_timeout_s is 20: rank 0's next collective
    times out, and the one paragraph names rank 1 and the step it last began; exit 1, no traceback."""
    run_dir = tmp_path / "run"
    job = job_dict(
        SFT_JOB,
        run_dir,
        training={"max_steps": 8, "max_failures": 0},
        cluster={"workers": 2, "collective_timeout_s": 20},
    )
    started = time.monotonic()
    proc, message = train_with_fault(tmp_path, job, HOLD="1@3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert message.startswith("training failed: rank 0"), message
    assert "rank 1 did not arrive in the collective that rank(s) 0 waited for" in message, message
    assert "(its last sign: finished step 3, " in message, message
    assert time.monotonic() - started < 300  # bounded by the timeout, not by the hold (an hour)


def test_an_error_raised_in_every_rank_is_reported_at_once_not_retried(ray_session, tmp_path):
    """Every rank raises ValueError after step 3 with restarts left: one attempt, exit 1, each rank named with
    its error and log, and no restart in metrics.jsonl (a restart would meet the same error)."""
    run_dir = tmp_path / "run"
    job = job_dict(SFT_JOB, run_dir, training={"max_steps": 8, "max_failures": 2}, output={"save_steps": 2})
    proc, message = train_with_fault(tmp_path, job, RAISE="3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert message.startswith("training failed: rank 0"), message
    for rank in (0, 1):
        assert f"rank {rank}" in message and f"worker-{rank}.log" in message, message
    assert "ValueError: injected at step 3" in message and "was not retried" in message, message
    records = read_metrics(run_dir / "metrics.jsonl")
    assert not [r for r in records if r.get("event") == "restart"]
    assert [r["step"] for r in records if r.get("event") == "start"] == [0]  # one attempt
    started = (run_dir / "logs" / "worker-0.log").read_text(errors="replace").count("runs on Ray node")
    assert started == 1
