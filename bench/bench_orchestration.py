"""Orchestration overhead: tuneyard SFT on Ray (2 workers, ZeRO-2) vs the same trainer under torchrun.

Both sides run `tuneyard.training.causal_lm_recipe.run_training` with the same job, so the only difference is who
starts and connects the processes. Rounds alternate the two sides to spread machine noise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from bench.common import ROOT, sft_job, steady_rate
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.run_job import run_job
from tuneyard.training.run_dir import job_identity, prepare_run_dir


def run_torchrun(job: dict) -> None:
    """Run the job's workers under torchrun on this machine."""
    run_dir = Path(job["output"]["dir"])
    prepare_run_dir(job_from_dict(job).output, job_identity(job))
    path = run_dir / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(job["cluster"]["workers"]),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            "29533",
            str(ROOT / "bench" / "torchrun_sft.py"),
            str(path),
        ],
        check=True,
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )


def main(work: Path, rounds: int = 2) -> dict:
    """Samples/s of each side per round and the ratio of their medians."""
    train = str(ROOT / "examples" / "data" / "last-word-train.jsonl")
    ray_rates, torchrun_rates = [], []
    for i in range(rounds):
        ray_job = sft_job(work / f"ray-{i}", train)
        run_job(job_from_dict(ray_job), show_progress=False)
        ray_rates.append(steady_rate(work / f"ray-{i}", "samples_per_s"))
        torch_job = sft_job(work / f"torchrun-{i}", train)
        run_torchrun(torch_job)
        torchrun_rates.append(steady_rate(work / f"torchrun-{i}", "samples_per_s"))
    ratio = sorted(ray_rates)[len(ray_rates) // 2] / sorted(torchrun_rates)[len(torchrun_rates) // 2]
    return {
        "ray_samples_per_s": ray_rates,
        "torchrun_samples_per_s": torchrun_rates,
        "ratio": ratio,
        "target": ">= 0.95",
    }
