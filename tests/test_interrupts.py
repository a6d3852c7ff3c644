"""Ctrl-C (SIGINT) and SIGTERM in every phase of `tuneyard train`: exit 130 (143) within a bound with one line
naming the phase, no process of the run left, outcome.json saying interrupted, and the same command again going
on from where the run stood (its newest complete checkpoint, or only its figures left to score).

Each phase is reached on purpose: TUNEYARD_FAULT_PARK stops the driver as it enters a phase, TUNEYARD_FAULT_PAUSE
stops rank 0 inside a checkpoint's save, and TUNEYARD_FAULT_HOLD keeps training from running past a step. The runs
of one test form a chain: each run is the rerun of the one interrupted before it, so every interrupt is followed by
the proof that the run goes on from there."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import SFT_JOB, job_dict, processes_of_session
from tests.ppo_jobs import ppo_job
from tuneyard.training.faults import parked_name
from tuneyard.training.metrics import read_metrics
from tuneyard.training.run_dir import read_outcome

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Train:
    """`tuneyard train JOB` in a session of its own, with its stderr collected."""

    def __init__(self, job_path: Path, run_dir: Path, **faults: str):
        env = {**os.environ, **{f"TUNEYARD_FAULT_{k.upper()}": v for k, v in faults.items()}}
        command = [sys.executable, "-m", "tuneyard.launch.cli", "train", str(job_path)]
        # started as a non-interactive shell starts `cmd &`: with SIGINT ignored, which the CLI must undo
        self.proc = subprocess.Popen(
            command,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        self.run_dir = run_dir

    def wait_for(self, path: Path, timeout_s: float = 300) -> None:
        """Until `path` exists (the run failing first is an error that shows its stderr)."""
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if self.proc.poll() is not None:
                pytest.fail(
                    f"the run ended ({self.proc.returncode}) before {path.name}: {self.proc.stderr.read()[-3000:]}"
                )
            assert time.monotonic() < deadline, f"no {path} after {timeout_s} s"
            time.sleep(0.1)

    def interrupt(self, signum: signal.Signals, phase: str) -> None:
        """Send `signum` and check the run stops as an interrupt must, naming `phase`."""
        sent = time.monotonic()
        self.proc.send_signal(signum)
        _, err = self.proc.communicate(timeout=120)
        assert time.monotonic() - sent < 60, f"{phase}: {time.monotonic() - sent:.0f} s to stop"
        assert self.proc.returncode == EXIT[signum] and "Traceback" not in err, (phase, err[-3000:])
        line = f"interrupted: {signum.name} while {phase}"
        assert line in err and "continue from the newest complete checkpoint" in err, (line, err[-2000:])
        left = processes_of_session(self.proc.pid)
        deadline = time.monotonic() + 5  # a killed process may take a moment to leave the process table
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = processes_of_session(self.proc.pid)
        assert not left, (phase, left)
        assert read_outcome(self.run_dir)["status"] == "interrupted", (phase, read_outcome(self.run_dir))

    def finish(self) -> str:
        """Wait for a run that is left alone; its stderr."""
        _, err = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, err[-3000:]
        return err


def parked(run_dir: Path, phase: str) -> Path:
    return run_dir / "faults" / f"parked-{parked_name(phase)}"


def complete(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"checkpoint-{step}" / "tuneyard-complete"


def starts(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "start"]


def test_the_phase_an_interrupt_names(tmp_path):
    from tuneyard.training.interrupts import Terminated, current_phase, driver_phase

    driver_phase("checking the job", tmp_path)
    assert current_phase() == "checking the job"
    rows = [{"event": "start", "step": 0}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "x": 0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    driver_phase("running the workers", tmp_path)
    assert current_phase() == "running the workers (after step 2)"
    driver_phase("generating", tmp_path, "iteration 2 of 4")
    assert current_phase() == "generating (iteration 2 of 4)"
    assert issubclass(Terminated, KeyboardInterrupt) and Terminated.exit_code == 143
    assert parked_name("publishing final/") == "publishing-final"


@pytest.mark.integration
def test_an_interrupt_in_every_phase_of_an_spmd_run(tmp_path):
    """SFT on a local Ray with 2 workers, 8 steps, a checkpoint every 2. SIGTERM outside training ends the run as
    SIGINT does (143); inside it, it is a preemption warning (tests/test_preemption.py)."""
    run_dir = tmp_path / "run"
    job = job_dict(SFT_JOB, run_dir, training={"max_steps": 8, "eval_steps": None}, output={"save_steps": 2})
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))

    for phase, signum in [
        ("checking the job", signal.SIGINT),
        ("tokenising the data", signal.SIGINT),
        ("starting Ray", signal.SIGTERM),
        ("running the workers", signal.SIGINT),
    ]:
        run = Train(job_path, run_dir, park=phase)
        run.wait_for(parked(run_dir, phase))
        run.interrupt(signum, phase)
    assert not (run_dir / "metrics.jsonl").exists() or not starts(run_dir)  # no worker began yet

    run = Train(job_path, run_dir, hold="1@3")  # training: checkpoint-2 on disk, rank 1 held after step 3
    run.wait_for(complete(run_dir, 2))
    run.interrupt(signal.SIGINT, "running the workers")

    run = Train(job_path, run_dir, pause="written@4")  # rank 0 stops inside the save of checkpoint-4
    run.wait_for(run_dir / "faults" / "paused-written-4")
    run.interrupt(signal.SIGINT, "running the workers")
    assert not complete(run_dir, 4).exists() and complete(run_dir, 2).exists()  # the save in flight is never marked

    run = Train(job_path, run_dir, park="scoring the figures")  # trains to the end from checkpoint-2
    run.wait_for(parked(run_dir, "scoring the figures"))
    run.interrupt(signal.SIGINT, "scoring the figures")
    assert (run_dir / "final" / "model.safetensors").exists()

    Train(job_path, run_dir).finish()  # only the figures were left
    outcome = read_outcome(run_dir)
    assert outcome["status"] == "finished" and "eval loss" in outcome["figures"], outcome
    assert starts(run_dir)[0] == 0 and 2 in starts(run_dir)[1:]  # the reruns went on from checkpoint-2
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert set(steps) == set(range(1, 9)), steps


def grpo_job_file(tmp_path: Path, policy: str, iterations: int, **ppo: dict) -> Path:
    """A small critic-free PPO job (a checkpoint after every iteration) written to tmp_path/job.yaml."""
    settings = {"advantage": "grpo", "iterations": iterations, "rollout_batch_size": 4, "mini_batch_size": 8}
    job = ppo_job(tmp_path, policy, "run", ppo={**settings, "save_every": 1, **ppo})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.integration
def test_an_interrupt_in_every_phase_of_a_ppo_run(tmp_path, sft_base):
    """PPO (GRPO's estimator, HF generate), 4 iterations, a checkpoint after each."""
    run_dir = tmp_path / "run"
    job_path = grpo_job_file(tmp_path, sft_base, iterations=4)
    for phase, park, signum, shown in [
        ("starting the role actors", "starting the role actors", signal.SIGINT, "starting the role actors"),
        ("generating", "generating@2", signal.SIGINT, "generating (iteration 2 of 4)"),
        # each rerun resumes from checkpoint-1: its first iteration is 2
        ("scoring", "scoring", signal.SIGINT, "scoring (iteration 2 of 4)"),
        ("updating", "updating", signal.SIGINT, "updating (iteration 2 of 4)"),
        ("saving a checkpoint", "saving a checkpoint", signal.SIGINT, "saving a checkpoint (checkpoint-2)"),
        ("publishing final/", "publishing final/", signal.SIGINT, "publishing final/"),
    ]:
        run = Train(job_path, run_dir, park=park)
        run.wait_for(parked(run_dir, phase))
        run.interrupt(signum, shown)
        if phase == "saving a checkpoint":
            assert not complete(run_dir, 2).exists() and complete(run_dir, 1).exists()
    Train(job_path, run_dir).finish()
    assert read_outcome(run_dir)["status"] == "finished"
    assert starts(run_dir)[0] == 0 and starts(run_dir)[-1] == 3  # the last rerun went on from checkpoint-3
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "reward" in r][-1] == 4


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make install-vllm)")
def test_an_interrupt_during_the_weight_sync_stops_the_engines(tmp_path, vllm_base):
    """PPO with a vLLM engine parked as it syncs the weights of iteration 2: the engine goes with the run."""
    run_dir = tmp_path / "run"
    engine = {"generation": {"engine": "vllm"}, "roles": {"rollout": {"cpus_per_worker": 0.5}}}
    job_path = grpo_job_file(tmp_path, vllm_base, iterations=2, **engine)
    run = Train(job_path, run_dir, park="syncing weights@2")
    run.wait_for(parked(run_dir, "syncing weights"))
    run.interrupt(signal.SIGINT, "syncing weights (iteration 2 of 2)")
    Train(job_path, run_dir).finish()
    assert starts(run_dir) == [0, 1]
