"""Ray Jobs against a real two-node Ray on 127.0.0.1 with token auth: submit, status, logs, stop, bad input."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PRETRAIN_JOB, SFT_JOB, job_dict
from tests.test_loopback import LOOPBACK, needs_private_network

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
NODE_LINE = re.compile(r"rank (\d+) \(pid \d+\) runs on Ray node ([0-9a-f]+)")


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on right now (held open together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def own_processes(marker: str) -> list[int]:
    """PIDs whose command line names `marker` (this fixture's own temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class TwoNodeRay:
    """A Ray head and a second raylet, both `ray start --block` on 127.0.0.1, each with its own temp dir."""

    def __init__(self, root: Path, token: str):
        self.root = root
        self.token = token
        gcs, dashboard, client, *node_ports = free_ports(3 + 2 * 6)
        self.gcs = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",  # the jobs' entrypoint finds `tuneyard`
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []
        common = [
            "--block",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--min-worker-port=0",
            "--max-worker-port=0",
        ]
        for i, extra in enumerate(
            (
                [
                    "--head",
                    f"--port={gcs}",
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}",
                    f"--ray-client-server-port={client}",
                ],
                [f"--address={self.gcs}"],
            )
        ):
            p = node_ports[6 * i : 6 * i + 6]
            ports = [
                f"--node-manager-port={p[0]}",
                f"--object-manager-port={p[1]}",
                f"--runtime-env-agent-port={p[2]}",
                f"--dashboard-agent-grpc-port={p[3]}",
                f"--dashboard-agent-listen-port={p[4]}",
                f"--metrics-export-port={p[5]}",
            ]
            log = open(root / f"node{i}.log", "w")
            self.procs.append(
                subprocess.Popen(
                    [str(BIN / "ray"), "start", *common, *ports, f"--temp-dir={root / f'n{i}'}", *extra],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, which teardown ends
                )
            )
            if i == 0:
                self._wait_for(lambda: self.alive_nodes() >= 1, "the head")
        self._wait_for(lambda: self.alive_nodes() >= 2, "the second node")

    def alive_nodes(self) -> int:
        """Alive nodes, as the dashboard's REST API lists them (with the token)."""
        import requests

        try:
            reply = requests.get(
                f"{self.dashboard}/nodes?view=summary",
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=5,
            )
            summary = reply.json()["data"]["summary"]
        except Exception:
            return 0
        return sum(1 for node in summary if node.get("raylet", {}).get("state") == "ALIVE")

    def node_addresses(self) -> set[str]:
        """The IP address each alive node registered with (the dashboard's node summary)."""
        import requests

        reply = requests.get(
            f"{self.dashboard}/nodes?view=summary", headers={"Authorization": f"Bearer {self.token}"}, timeout=5
        )
        return {
            node.get("ip") or node["raylet"]["nodeManagerAddress"]
            for node in reply.json()["data"]["summary"]
            if node.get("raylet", {}).get("state") == "ALIVE"
        }

    def _wait_for(self, condition, what: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.stop()
                logs = "\n".join((self.root / f"node{i}.log").read_text()[-2000:] for i in range(len(self.procs)))
                raise RuntimeError(f"{what} of the test Ray did not come up:\n{logs}")
            time.sleep(0.5)

    def stop(self) -> None:
        """TERM each `ray start --block` group (it stops its node), KILL what is left of ours after 10 s."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # members of the group outlive its leader
            except ProcessLookupError:
                pass
        time.sleep(1)
        for pid in own_processes(str(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def two_node_ray():
    """A two-node Ray with token auth; the CLI reaches it through RAY_AUTH_TOKEN in its environment."""
    # a short root: Ray's unix socket paths under it must stay below 108 characters
    root = Path(tempfile.mkdtemp(prefix="tyray", dir="/tmp"))
    cluster = TwoNodeRay(root, secrets.token_hex(32))
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "tuneyard"), *args], capture_output=True, text=True, timeout=timeout, env=env or os.environ
    )


def client_env(cluster: TwoNodeRay, token: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["RAY_AUTH_TOKEN"] = cluster.token if token is None else token
    env["HOME"] = str(cluster.root)  # no ~/.ray/auth_token of the machine's user gets in the way
    return env


def write_job(path: Path, run_dir: Path, **training) -> Path:
    job = job_dict(
        SFT_JOB,
        run_dir,
        training={"max_steps": 8, "eval_steps": 8, **training},
        cluster={"workers": 2, "cpus_per_worker": 1, "placement": "strict_spread"},
    )
    path.write_text(yaml.safe_dump(job))
    return path


def wait_status(cluster: TwoNodeRay, job_id: str, want: tuple[str, ...], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        proc = cli("status", job_id, "--ray", cluster.dashboard, env=client_env(cluster))
        assert proc.returncode == 0, proc.stderr
        state = proc.stdout.split()[1]
        if state in want:
            return state
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {state} after {timeout_s}s")


def submitted_id(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"submitted Ray job (\S+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def test_submit_runs_to_success_one_worker_per_node(two_node_ray, tmp_path):
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.yaml", run_dir)
    job_id = submitted_id(cli("submit", str(job), "--ray", two_node_ray.dashboard, env=client_env(two_node_ray)))

    assert wait_status(two_node_ray, job_id, ("SUCCEEDED", "FAILED", "STOPPED"), 400) == "SUCCEEDED"
    logs = cli("logs", job_id, "--ray", two_node_ray.dashboard, env=client_env(two_node_ray))
    assert logs.returncode == 0, logs.stderr
    assert f"run: {run_dir}" in logs.stdout and "eval loss" in logs.stdout, logs.stdout[-3000:]
    assert (run_dir / "final" / "model.safetensors").exists()

    # strict_spread: the two workers ran on the two different raylets
    nodes = {}
    for log in (run_dir / "logs").glob("worker-*.log"):
        for rank, node in NODE_LINE.findall(log.read_text()):
            nodes[int(rank)] = node
    assert set(nodes) == {0, 1} and nodes[0] != nodes[1], nodes

    # the token travelled in headers and the environment only: not in the run dir, the job, or its logs
    token = two_node_ray.token.encode()
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and token in p.read_bytes()]
    assert not leaked and two_node_ray.token not in logs.stdout
    details = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", two_node_ray.dashboard, job_id, "-v"],
        capture_output=True,
        text=True,
        env={**client_env(two_node_ray), "RAY_AUTH_MODE": "token"},
        timeout=60,
    )
    assert details.returncode == 0 and two_node_ray.token not in details.stdout + details.stderr


def test_prepare_spreads_a_streamed_corpus_over_both_nodes(two_node_ray, tmp_path):
    """data.streaming: `tuneyard prepare` against the cluster runs its shard tasks on both raylets."""
    data = {"streaming": True, "shard_mb": 0.2, "eval": None}
    job = job_dict(PRETRAIN_JOB, tmp_path / "run", data=data, cluster={"workers": 2, "address": two_node_ray.gcs})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    proc = cli("prepare", str(tmp_path / "job.yaml"), env={**client_env(two_node_ray), "RAY_AUTH_MODE": "token"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = Path(proc.stdout.strip().rsplit(" in ", 1)[1])
    shards = json.loads((folder / "manifest.json").read_text())["shards"]
    assert len(shards) == 4 and len({shard["node"] for shard in shards}) == 2, shards


def test_stop_ends_a_long_job_and_frees_its_workers(two_node_ray, tmp_path):
    run_dir = tmp_path / "long"
    job = write_job(tmp_path / "job.yaml", run_dir, max_steps=100_000, eval_steps=None)
    job_id = submitted_id(cli("submit", str(job), "--ray", two_node_ray.dashboard, env=client_env(two_node_ray)))
    deadline = time.monotonic() + 300
    while not any('"loss"' in line for line in _lines(run_dir / "metrics.jsonl")):
        assert time.monotonic() < deadline, "the long job never reached its first step"
        time.sleep(1)

    stopped = cli("stop", job_id, "--ray", two_node_ray.dashboard, env=client_env(two_node_ray))
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.split()[1] == "STOPPED", stopped.stdout
    # the workers went with the driver: both nodes' CPUs are free again
    deadline = time.monotonic() + 60
    while _free_cpus(two_node_ray) < 4:
        assert time.monotonic() < deadline, f"CPUs still held after stop: {_free_cpus(two_node_ray)} of 4 free"
        time.sleep(1)
    steps = [json.loads(line)["step"] for line in _lines(run_dir / "metrics.jsonl") if '"loss"' in line]
    assert steps and max(steps) < 100_000 and not (run_dir / "final").exists()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _free_cpus(cluster: TwoNodeRay) -> float:
    import requests

    reply = requests.get(
        f"{cluster.dashboard}/api/cluster_status",
        headers={"Authorization": f"Bearer {cluster.token}"},
        timeout=10,
    ).json()
    usage = reply["data"]["clusterStatus"]["loadMetricsReport"]["usage"]
    used, total = usage.get("CPU", [0, 0])
    return total - used


def test_wrong_token_is_refused_plainly(two_node_ray, tmp_path):
    proc = cli("status", "no-such-job", "--ray", two_node_ray.dashboard, env=client_env(two_node_ray, "0" * 64))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "needs its auth token" in proc.stderr and "0" * 64 not in proc.stderr


def test_unknown_job_id(two_node_ray):
    proc = cli("logs", "tuneyard-nope-00000000", "--ray", two_node_ray.dashboard, env=client_env(two_node_ray))
    assert proc.returncode == 2 and "has no job 'tuneyard-nope-00000000'" in proc.stderr, proc.stderr


def test_unreachable_address_fails_fast(tmp_path):
    port = free_ports(1)[0]
    job = write_job(tmp_path / "job.yaml", tmp_path / "run")
    started = time.monotonic()
    submit = cli("submit", str(job), "--ray", f"http://127.0.0.1:{port}")
    train = cli("train", str(job), f"cluster.address=127.0.0.1:{port}")
    assert time.monotonic() - started < 60  # each answer comes within seconds, not Ray's minutes of retries
    for proc in (submit, train):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "cannot reach the Ray cluster" in proc.stderr and str(port) in proc.stderr
    assert not (tmp_path / "run" / "final").exists()


@needs_private_network
def test_the_two_node_test_ray_has_only_loopback_nodes(two_node_ray):
    addresses = two_node_ray.node_addresses()
    assert len(addresses) >= 1 and all(ipaddress.ip_address(a) in LOOPBACK for a in addresses), addresses
