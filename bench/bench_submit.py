"""Time from `tuneyard submit` to the first training step, on the local two-node SLURM and a two-node Ray.

SLURM (`--slurm --nodes 2`): the submit command itself (job validated, sbatch called), allocation
(-> the batch script starts), Ray cluster up (head and worker raylet started, both joined), job
start (`tuneyard train` -> first optimizer step).
Ray Jobs (`--ray`, cluster already up): the submit command (job validated, working_dir uploaded),
driver start (-> job RUNNING), job start (-> first optimizer step).
The job is the tests' tiny SFT on 2 workers, one per node. Needs root and slurm-wlm for the SLURM half.

    python bench/bench_submit.py [--rounds N]      (results also in bench/results/submit.json)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT  # noqa: E402
from tests.conftest import SFT_JOB, job_dict  # noqa: E402
from tests.test_cluster_ray import TwoNodeRay  # noqa: E402
from tests.test_cluster_slurm import free_port_run  # noqa: E402
from tuneyard.cluster import ray_jobs  # noqa: E402
from tuneyard.training.metrics import read_metrics  # noqa: E402

BIN = Path(sys.executable).parent
SAY = re.compile(r"tuneyard-slurm (\d\d:\d\d:\d\d\.\d+): (.*)")


def write_job(work: Path, name: str) -> tuple[Path, Path]:
    """The tiny SFT job (5 steps, 2 workers spread over the 2 nodes) as a YAML file, and its run dir."""
    run_dir = work / name
    job = job_dict(
        SFT_JOB,
        run_dir,
        training={"max_steps": 5, "eval_steps": None},
        cluster={"workers": 2, "cpus_per_worker": 1, "placement": "strict_spread"},
    )
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path, run_dir


def first_step_time(run_dir: Path, timeout_s: float) -> float:
    """Epoch time of the first logged optimizer step, waiting for it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
        if steps:
            return steps[0]["time"]
        time.sleep(0.2)
    raise RuntimeError(f"no training step in {run_dir} after {timeout_s}s")


def say_times(log: Path) -> dict[str, float]:
    """Epoch times of the sbatch script's own log lines (HH:MM:SS.mmm of today), by their text."""
    today = datetime.now().date()
    times = {}
    for clock, text in SAY.findall(log.read_text(errors="replace")):
        stamp = datetime.combine(today, datetime.strptime(clock, "%H:%M:%S.%f").time())
        times.setdefault(text.split(":")[0].split(" (")[0], stamp.timestamp())
    return times


def slurm_round(work: Path, env: dict, name: str) -> dict[str, float]:
    """One `tuneyard submit --slurm` of the tiny job, split into allocation, Ray up, job start."""
    job, run_dir = write_job(work, name)
    started = time.time()
    proc = subprocess.run(
        [str(BIN / "tuneyard"), "submit", str(job), "--slurm", "--nodes", "2", "--ray-tmp", str(work / "r")],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    )
    submitted = time.time()
    job_id = re.search(r"submitted SLURM job (\d+)", proc.stdout).group(1)
    step = first_step_time(run_dir, 600)
    times = say_times(work / f"slurm-{job_id}.out")
    allocated = next(t for text, t in times.items() if text.startswith("job "))
    ray_up = times["Ray is up"]
    subprocess.run(["scancel", job_id], env=env, check=False)
    return {
        "submit_command_s": submitted - started,
        "allocation_s": allocated - submitted,
        "ray_cluster_up_s": ray_up - allocated,
        "job_start_s": step - ray_up,
        "total_s": step - started,
    }


def ray_round(work: Path, cluster: TwoNodeRay, name: str) -> dict[str, float]:
    """One `tuneyard submit --ray` of the tiny job, split into submission, driver start, job start."""
    job, run_dir = write_job(work, name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN"] = cluster.token
    started = time.time()
    proc = subprocess.run(
        [str(BIN / "tuneyard"), "submit", str(job), "--ray", cluster.dashboard],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    submitted = time.time()
    job_id = re.search(r"submitted Ray job (\S+)", proc.stdout).group(1)
    os.environ["RAY_AUTH_TOKEN"] = cluster.token
    while ray_jobs.status(cluster.dashboard, job_id)[0] == "PENDING":
        time.sleep(0.1)
    running = time.time()
    step = first_step_time(run_dir, 600)
    ray_jobs.stop(cluster.dashboard, job_id, wait_s=60)
    return {
        "submit_command_s": submitted - started,
        "driver_start_s": running - submitted,
        "job_start_s": step - running,
        "total_s": step - started,
    }


def median(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in rounds), 2) for key in rounds[0]}


def main(work: Path, rounds: int = 1) -> dict:
    """Both halves, `rounds` times each; medians of each phase."""
    result: dict = {}
    if shutil.which("slurmctld") and os.geteuid() == 0:
        slurm_dir = Path(tempfile.mkdtemp(prefix="tybs", dir="/tmp"))
        env = {**os.environ, "TUNEYARD_SLURM_DIR": str(slurm_dir), "TUNEYARD_SLURM_PORT": str(free_port_run(3))}
        subprocess.run([str(ROOT / "slurm" / "local-cluster.sh"), "up"], env=env, check=True, capture_output=True)
        env["SLURM_CONF"] = str(slurm_dir / "slurm.conf")
        try:
            result["slurm"] = median([slurm_round(work, env, f"slurm{i}") for i in range(rounds)])
        finally:
            subprocess.run([str(ROOT / "slurm" / "local-cluster.sh"), "down"], env=env, check=False)
            shutil.rmtree(slurm_dir, ignore_errors=True)
        print(f"[submit --slurm] {result['slurm']}")
    ray_root = Path(tempfile.mkdtemp(prefix="tybr", dir="/tmp"))
    started = time.time()
    cluster = TwoNodeRay(ray_root, secrets.token_hex(32))
    cluster_up = time.time() - started
    try:
        result["ray"] = {**median([ray_round(work, cluster, f"ray{i}") for i in range(rounds)])}
        result["ray"]["cluster_up_beforehand_s"] = round(cluster_up, 2)
    finally:
        cluster.stop()
        shutil.rmtree(ray_root, ignore_errors=True)
    print(f"[submit --ray]   {result['ray']}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tybench") as tmp:
        figures = main(Path(tmp), args.rounds)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "submit.json").write_text(json.dumps(figures, indent=2))
