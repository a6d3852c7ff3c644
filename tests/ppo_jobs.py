"""The PPO job the PPO tests start from, and their helpers: shared by several test files.

Kept apart from tests/test_ppo.py so that importing them does not import that test module a second time under
another name (which would register its test reward functions again, bound to another module's state)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys

import pytest
import yaml

from tests.conftest import EXAMPLES, job_dict
from tuneyard.training.metrics import read_metrics

DATA = EXAMPLES / "data"
PPO_JOB = {
    "stage": "ppo",
    "model": {"name_or_path": "set-by-test"},
    "data": {
        "format": "prompt",
        "train": str(DATA / "last-word-prompts-train.jsonl"),
        "eval": str(DATA / "last-word-prompts-eval.jsonl"),
        "max_length": 128,
    },
    "ppo": {
        "rollout_batch_size": 16,
        "samples_per_prompt": 2,
        "mini_batch_size": 16,
        "micro_batch_size": 8,
        "generation": {"max_new_tokens": 8, "temperature": 0.7},
        "roles": {
            "policy": {"cpus_per_worker": 0.5},
            "critic": {"cpus_per_worker": 0.5},
            "reference": {"cpus_per_worker": 0.5},
            "reward": {"cpus_per_worker": 0.5},
        },
    },
    "reward": {"functions": [{"name": "last_word_exact"}, {"name": "one_word", "weight": 0.2}]},
    "training": {"learning_rate": 5e-4, "lr_scheduler": "constant", "seed": 7, "precision": "fp32"},
    "deepspeed": {"zero_stage": 2},
    "output": {"dir": "set-by-test"},
}


def ppo_job(tmp_path, policy: str, name: str, **sections: dict) -> dict:
    """A PPO job dict from PPO_JOB with the policy folder and some sections' keys replaced (`ppo` merged deeply)."""
    ppo = sections.pop("ppo", {})
    job = job_dict(PPO_JOB, tmp_path / name, **sections)
    job["model"] = {"name_or_path": policy}
    job["data"].pop("cache_dir")
    for key, value in ppo.items():
        job["ppo"][key] = {**job["ppo"].get(key, {}), **value} if isinstance(value, dict) else value
    return job


def iterations_of(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward" in r]


def run_cli(tmp_path, job: dict, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return subprocess.run(
        [sys.executable, "-m", "tuneyard.launch.cli", "train", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make install-vllm)"
)
ENGINE = {"generation": {"engine": "vllm"}, "roles": {"rollout": {"cpus_per_worker": 0.5}}}


def engine_job(tmp_path, policy: str, name: str, **ppo) -> dict:
    """A critic-free PPO job (GRPO's estimator, 2 answers per prompt) whose rollouts come from one vLLM engine."""
    settings = {"advantage": "grpo", "iterations": 3, **ENGINE}
    for key, value in ppo.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    return ppo_job(tmp_path, policy, name, ppo=settings)


def kill_engine(run_dir) -> None:
    """SIGKILL the rollout engine's actor (its pid is in its log)."""
    lines = (run_dir / "logs" / "rollout-0.log").read_text().splitlines()
    pid = int([x for x in lines if "rollout engine 0 of 1: pid" in x][-1].rsplit(" ", 1)[-1])
    os.kill(pid, signal.SIGKILL)
