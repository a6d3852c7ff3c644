"""A local job larger than this machine is refused before Ray or any worker starts: CPUs beyond twice the cores
(unless cluster.oversubscribe), and the workers' memory (a worker's base plus the plan's share) beyond what is free."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import PRETRAIN_JOB, ROOT, SFT_JOB, TINY_ARCH, job_dict
from tuneyard.cluster.config import ClusterConfig
from tuneyard.cluster.resources import (
    OVERSUBSCRIBE_FACTOR,
    WORKER_BASE_BYTES,
    demand_of,
    free_memory,
    local_shortfall,
    machine_cores,
)
from tuneyard.launch.config import job_from_dict


def test_a_64_worker_local_job_is_refused_in_seconds_before_anything_starts(tmp_path):
    workers = max(64, OVERSUBSCRIBE_FACTOR * machine_cores() + 1)
    job = job_dict(SFT_JOB, tmp_path / "run", cluster={"workers": workers})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tuneyard.launch.cli", "train", str(tmp_path / "job.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.strip().splitlines()
    assert len(message) == 1 and "Traceback" not in proc.stderr, proc.stderr
    cores = machine_cores()
    assert message[0].startswith(
        f"error: cluster.workers {workers} x cluster.cpus_per_worker 1 = {workers} CPUs, but this machine has "
        f"{cores} cores, and a local Ray takes at most 2 CPUs per core ({2 * cores})"
    )
    assert "cluster.oversubscribe: true" in message[0]
    # refused before Ray started (the CLI starts it before run_job's imports) and before the run directory exists
    assert not (tmp_path / "run").exists()
    assert seconds < 30, seconds  # measured here: 4 s, most of it the CLI's imports


def test_oversubscribe_lets_a_modest_oversubscription_through():
    """A real local Ray started through `ray_cluster`, in a fresh process (this one may hold the session's Ray)."""
    workers = OVERSUBSCRIBE_FACTOR * machine_cores() + 1
    script = (
        "import ray\n"
        "from tuneyard.cluster.config import ClusterConfig\n"
        "from tuneyard.cluster.ray_cluster import ClusterError, ray_cluster\n"
        f"try:\n    with ray_cluster(ClusterConfig(workers={workers})): pass\n"
        "except ClusterError as exc:\n    print('refused:', exc)\n"
        f"with ray_cluster(ClusterConfig(workers={workers}, oversubscribe=True)):\n"
        "    print('cpus:', ray.cluster_resources()['CPU'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(f"refused: cluster.workers {workers} x cluster.cpus_per_worker 1 = {workers} CPUs")
    assert lines[1] == f"cpus: {float(workers)}"


def test_memory_beyond_what_is_free_is_refused_with_the_arithmetic():
    free = 10 * 2**30
    workers = math.floor(free / WORKER_BASE_BYTES) + 1  # one more than fits
    demand = demand_of(ClusterConfig(workers=workers))
    text = local_shortfall(demand, oversubscribe=True, cores=64, free=free)
    assert text.startswith(
        f"cluster.workers {workers} x a worker's base 0.50 GiB = {workers * 0.5:.2f} GiB of memory, but this machine "
        f"has 10.00 GiB free (MemAvailable, within any cgroup limit): room for about {workers - 1} of the {workers} "
    )
    assert local_shortfall(demand_of(ClusterConfig(workers=workers - 1)), True, 64, free) is None
    assert 0 < free_memory() and 0 < machine_cores()


def test_the_plan_share_counts_and_the_planner_says_the_same(tmp_path):
    """A 1.7B-shaped scratch model (counted on the meta device) on 2 CPU workers: full fine-tuning in fp32 holds
    weights, gradients and AdamW state of 1.7B parameters in each worker."""
    from tuneyard.launch.plan import Hardware, plan_job
    from tuneyard.launch.plan.host import local_demand
    from tuneyard.launch.plan.report import format_plan

    big = {**TINY_ARCH, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 8}
    big |= {"num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False}
    tree = job_dict(PRETRAIN_JOB, tmp_path / "run", cluster={"workers": 2}, deepspeed={"zero_stage": 2})
    tree["model"]["architecture"] = big
    job = job_from_dict(tree)
    demand = local_demand(job)
    share = demand.memory / 2 - WORKER_BASE_BYTES
    assert share > 1.5e9 * 10  # 4 B weights + (4 B gradients + 8 B AdamW state) / 2 workers, about 15 GiB
    text = local_shortfall(demand, oversubscribe=False, cores=64, free=16 * 2**30)
    assert text.startswith(f"cluster.workers 2 x (0.50 GiB a worker's base + {share / 2**30:.2f} GiB its model, ")
    assert "of memory, but this machine has 16.00 GiB free" in text
    # `tuneyard plan` of the same job on a 16 GiB node: the same figure, and the verdict that it does not fit
    plan = plan_job(job, Hardware(cpu_memory=16 * 2**30))
    assert plan.on_cpu and plan.peak_cpu == pytest.approx(demand.memory)
    printed = format_plan(plan, [])
    assert re.search(rf"CPU per node \(2 workers\) +{demand.memory / 2**30:.2f}   of 16.00", printed), printed
    assert f"a CPU job, does NOT fit: {demand.memory / 2**30:.2f} GiB of 16.00 GiB of CPU memory per node" in printed


def test_a_cluster_address_is_not_held_to_this_machine():
    """The gate sits where a local Ray starts; a cluster's own resources are checked by wait_for_resources."""
    from tuneyard.cluster.ray_cluster import ray_starting

    with ray_starting(ClusterConfig(address="127.0.0.1:1", workers=1000)) as wait_until_up:
        assert callable(wait_until_up)  # nothing refused; nothing is connected to until it is waited for
