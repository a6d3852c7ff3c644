"""A preemption warning (SIGUSR1) mid-training: a checkpoint, exit code 75, and a rerun that continues from it.
(Ctrl-C and SIGTERM outside training: tests/test_interrupts.py.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from tests.conftest import SFT_JOB, job_dict
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.run_job import run_job
from tuneyard.training.preemption import PREEMPTED_EXIT_CODE, RECORD_FILE, REQUEST_FILE, Preempted, preemption_watch


def test_watch_turns_a_signal_into_a_request_and_a_record_into_preempted(tmp_path):
    (tmp_path / REQUEST_FILE).write_text("stale\n")  # from an earlier, preempted attempt
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Preempted, match="stopped after step 3 of 9") as caught:
        with preemption_watch(tmp_path):
            assert not (tmp_path / REQUEST_FILE).exists()
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.1)  # the handler runs between bytecodes of this (main) thread
            assert (tmp_path / REQUEST_FILE).read_text() == "SIGUSR1\n"
            record = {"step": 3, "max_steps": 9, "checkpoint": str(tmp_path / "checkpoints" / "checkpoint-3")}
            (tmp_path / RECORD_FILE).write_text(json.dumps(record))  # what rank 0 writes after the save
    assert caught.value.exit_code == PREEMPTED_EXIT_CODE == 75
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.integration
def test_warning_mid_training_checkpoints_and_the_rerun_continues(tmp_path):
    """One process (--single): USR1 after the first step; the same job run again resumes and finishes."""
    run_dir = tmp_path / "run"
    job = job_from_dict(
        job_dict(
            SFT_JOB,
            run_dir,
            training={"max_steps": 40, "eval_steps": None},
            cluster={"workers": 1},
            output={"save_steps": 0},
        )
    )
    metrics = run_dir / "metrics.jsonl"

    def warn_after_first_step() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if metrics.exists() and '"loss"' in metrics.read_text():
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.05)

    warner = threading.Thread(target=warn_after_first_step, daemon=True)
    warner.start()
    with pytest.raises(Preempted) as caught:
        run_job(job, show_progress=False, single=True)
    warner.join()
    stopped_at = int(str(caught.value).split("after step ")[1].split()[0])
    assert 1 <= stopped_at < 40
    assert (run_dir / "checkpoints" / f"checkpoint-{stopped_at}").is_dir()
    assert not (run_dir / "final").exists()

    run_job(job, show_progress=False, single=True)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "start"] == [0, stopped_at]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 41))  # every step once: continued from the checkpoint, not restarted
    assert (run_dir / "final" / "model.safetensors").exists()
