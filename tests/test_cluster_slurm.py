"""A real two-node SLURM on this machine (slurm/local-cluster.sh): sbatch -> Ray on both nodes -> SFT.

One job carries the scenario: submitted with `--requeue` and hostile names, warned with USR1 after
its first step, it checkpoints, requeues itself, resumes from that checkpoint, and finishes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, SFT_JOB, job_dict

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("slurmctld") is None, reason="needs Debian's slurm-wlm (apt-get install slurm-wlm)"
    ),
]

BIN = Path(sys.executable).parent
LOCAL_CLUSTER = ROOT / "slurm" / "local-cluster.sh"
NODE_LINE = re.compile(r"rank (\d+) \(pid \d+\) runs on Ray node ([0-9a-f]+)")
MAX_STEPS = 60


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports in 17200-17999."""
    for base in range(17200, 18000, 10):
        try:
            sockets = []
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free ports for the test SLURM")


@pytest.fixture(scope="module")
def local_slurm():
    """slurm/local-cluster.sh up in a temp dir; the environment that points sbatch/squeue at it; down after."""
    root = Path(tempfile.mkdtemp(prefix="tyslurm", dir="/tmp"))
    env = {**os.environ, "TUNEYARD_SLURM_DIR": str(root), "TUNEYARD_SLURM_PORT": str(free_port_run(3))}
    up = subprocess.run([str(LOCAL_CLUSTER), "up"], env=env, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    env["SLURM_CONF"] = str(root / "slurm.conf")
    assert f"export SLURM_CONF={env['SLURM_CONF']}" in up.stdout
    yield env
    subprocess.run([str(LOCAL_CLUSTER), "down"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(root, ignore_errors=True)


def tuneyard(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tuneyard"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def job_state(env: dict, job_id: str) -> dict[str, str]:
    proc = tuneyard(env, "status", job_id, "--slurm")
    assert proc.returncode == 0, proc.stderr
    fields = proc.stdout.split()
    return {"state": fields[1], **dict(f.split("=", 1) for f in fields[2:])}


def loss_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


HOSTILE_NAME = "ty $(touch pwned-name) `touch pwned-tick`; \"q\" 's' | x"
HOSTILE_FILE = "job $(touch pwned-file) `touch pwned-tick2`; 'q'.yaml"
HOSTILE_OVERRIDE = "data.text_field=$(touch pwned-override);`touch pwned-tick3`"


@pytest.fixture(scope="module")
def preempted_job(local_slurm, tmp_path_factory):
    """Submit, wait for the first step, send the preemption warning, wait until the requeued run finished."""
    env = local_slurm
    work = tmp_path_factory.mktemp("slurm-work")
    ray_tmp = Path(tempfile.mkdtemp(prefix="tys", dir="/tmp"))  # short: Ray's socket paths live under it
    token = secrets.token_hex(32)
    token_file = work / "ray-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    run_dir = work / "run"
    job = job_dict(
        SFT_JOB,
        run_dir,
        training={"max_steps": MAX_STEPS, "eval_steps": None},
        cluster={"workers": 2, "cpus_per_worker": 1, "placement": "strict_spread"},
        output={"save_steps": 0},  # the only checkpoint will be the one the warning asks for
    )
    job_file = work / HOSTILE_FILE
    job_file.write_text(yaml.safe_dump(job))
    args = [
        "submit",
        str(job_file),
        HOSTILE_OVERRIDE,
        "--slurm",
        "--nodes",
        "2",
        "--requeue",
        "--job-name",
        HOSTILE_NAME,
        "--ray-tmp",
        str(ray_tmp),
        "--ray-token-file",
        str(token_file),
    ]
    started = time.monotonic()
    submitted = subprocess.run(
        [str(BIN / "tuneyard"), *args], env=env, cwd=work, capture_output=True, text=True, timeout=120
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted SLURM job (\d+)", submitted.stdout).group(1)
    script = subprocess.run(
        [str(BIN / "tuneyard"), *args, "--dry-run"], env=env, cwd=work, capture_output=True, text=True, timeout=120
    ).stdout

    while not loss_steps(run_dir):
        state = job_state(env, job_id)
        assert state["state"] in ("PENDING", "RUNNING"), (state, _log(run_dir, job_id))
        assert time.monotonic() - started < 400, f"no training step after 400s\n{_log(run_dir, job_id)}"
        time.sleep(1)
    warned_after = loss_steps(run_dir)[-1]
    signal = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, capture_output=True, text=True)
    assert signal.returncode == 0, signal.stderr

    while (state := job_state(env, job_id))["state"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() - started < 900, f"job {job_id} still {state} after 900s\n{_log(run_dir, job_id)}"
        time.sleep(2)
    yield {
        "env": env,
        "job_id": job_id,
        "state": state,
        "work": work,
        "run_dir": run_dir,
        "log": _log(run_dir, job_id),
        "token": token,
        "script": script,
        "warned_after": warned_after,
        "ray_tmp": ray_tmp,
    }
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _log(run_dir: Path, job_id: str) -> str:
    path = run_dir / "logs" / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no log yet)"


def test_warning_checkpoints_and_the_requeued_run_resumes_from_it(preempted_job):
    run_dir, log = preempted_job["run_dir"], preempted_job["log"]
    assert preempted_job["state"]["state"] == "COMPLETED", log[-4000:]
    assert preempted_job["state"]["restarts"] == "1", log[-4000:]
    starts = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"start"' in line]
    assert [s["step"] for s in starts][0] == 0 and len(starts) == 2, starts
    resumed_at = starts[1]["step"]
    # the checkpoint was written on the warning: after the step seen before it, before the end
    assert preempted_job["warned_after"] <= resumed_at < MAX_STEPS
    assert f"preempted: training stopped after step {resumed_at} of {MAX_STEPS}" in log
    assert "requeueing job" in log
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert f"checkpoint-{resumed_at}" in checkpoints
    steps = loss_steps(run_dir)
    first_run, second_run = steps[: steps.index(resumed_at) + 1], steps[steps.index(resumed_at) + 1 :]
    assert first_run == list(range(1, resumed_at + 1))
    assert second_run == list(range(resumed_at + 1, MAX_STEPS + 1))  # continued, not restarted
    assert (run_dir / "final" / "model.safetensors").exists()


def test_ray_spans_both_slurm_nodes_one_worker_each(preempted_job):
    log, run_dir = preempted_job["log"], preempted_job["run_dir"]
    assert preempted_job["state"]["nodes"] == "node[1-2]"
    assert log.count("Ray is up: 2 node(s)") == 2, log[-4000:]  # both runs
    last = {}
    for worker_log in (run_dir / "logs").glob("worker-*.log"):
        for rank, node in NODE_LINE.findall(worker_log.read_text()):
            last[int(rank)] = node  # the requeued run's line comes last
    assert set(last) == {0, 1} and last[0] != last[1], last


def test_hostile_values_stay_inert_and_the_token_is_not_written(preempted_job):
    env, work, job_id = preempted_job["env"], preempted_job["work"], preempted_job["job_id"]
    assert not list(work.glob("pwned*")) and not list(Path.cwd().glob("pwned*"))
    assert not list(work.glob("slurm-*.out"))  # SLURM's output went to the run dir's logs/, not the calling folder
    shown = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    assert f"JobName={HOSTILE_NAME}\n" in shown  # the name arrived as data, verbatim
    job_yaml = yaml.safe_load((preempted_job["run_dir"] / "job.yaml").read_text())
    assert job_yaml["data"]["text_field"] == HOSTILE_OVERRIDE.split("=", 1)[1]
    token = preempted_job["token"]
    assert token not in preempted_job["log"] and token not in preempted_job["script"]
    # nor in the run dir, SLURM's state, spool and logs, or the Ray nodes' session dirs (their logs)
    places = [preempted_job["run_dir"], Path(env["TUNEYARD_SLURM_DIR"]), preempted_job["ray_tmp"]]
    leaked = [p for place in places for p in place.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert not leaked


def test_logs_shows_the_job_output(preempted_job):
    proc = tuneyard(preempted_job["env"], "logs", preempted_job["job_id"], "--slurm")
    assert proc.returncode == 0, proc.stderr
    assert "Ray is up: 2 node(s)" in proc.stdout and "eval loss" in proc.stdout
    job_id, run_dir = preempted_job["job_id"], preempted_job["run_dir"]
    assert preempted_job["state"]["log"] == str(run_dir / "logs" / f"slurm-{job_id}.out")  # where `logs` read it


def test_stop_cancels_a_queued_job(local_slurm, tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_dict(SFT_JOB, tmp_path / "run")))
    later = "--sbatch-arg=--begin=now+1hour"  # queued, never started: stop is all this test exercises
    submitted = tuneyard(local_slurm, "submit", str(job_file), "--slurm", "--nodes", "1", later)
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted SLURM job (\d+)", submitted.stdout).group(1)
    assert job_state(local_slurm, job_id)["state"] == "PENDING"
    stopped = tuneyard(local_slurm, "stop", job_id, "--slurm")
    assert stopped.returncode == 0, stopped.stderr
    assert job_state(local_slurm, job_id)["state"] == "CANCELLED"


def test_ray_that_does_not_come_up_in_time_fails_the_job_clearly(local_slurm, tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_dict(SFT_JOB, tmp_path / "run")))
    ray_tmp = Path(tempfile.mkdtemp(prefix="tys", dir="/tmp"))
    args = ["--slurm", "--nodes", "2", "--ray-wait", "1", "--ray-tmp", str(ray_tmp)]
    submitted = subprocess.run(
        [str(BIN / "tuneyard"), "submit", str(job_file), *args],
        env=local_slurm,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted SLURM job (\d+)", submitted.stdout).group(1)
    deadline = time.monotonic() + 180
    while (state := job_state(local_slurm, job_id))["state"] in ("PENDING", "RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, state
        time.sleep(1)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert state["state"] == "FAILED"
    log = _log(tmp_path / "run", job_id)
    assert "tuneyard-slurm: error:" in log and "within 1s" in log, log[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # training never started
    assert not list(tmp_path.glob("slurm-*.out"))  # nothing left where sbatch was called


def test_more_nodes_than_the_partition_is_refused_plainly(local_slurm, tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_dict(SFT_JOB, tmp_path / "run")))
    proc = tuneyard(local_slurm, "submit", str(job_file), "--slurm", "--nodes", "3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "sbatch refused the job" in proc.stderr and "Node count specification invalid" in proc.stderr
    assert "--nodes 3 asks for more nodes than partition 'debug' has (2)" in proc.stderr


def test_status_of_an_unknown_job(local_slurm):
    proc = tuneyard(local_slurm, "status", "999999", "--slurm")
    assert proc.returncode == 2 and "SLURM does not know job 999999" in proc.stderr, proc.stderr
