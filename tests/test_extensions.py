"""The torch extension cache: one folder per torch/DeepSpeed build, and dead builds' locks cleared before a run."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tuneyard.cluster.extensions import clear_stale_locks, default_extensions_dir, extensions_dir
from tuneyard.cluster.ray_cluster import worker_env

# what torch.utils.cpp_extension.load does around a build: FileBaton on <TORCH_EXTENSIONS_DIR>/<name>/lock
HOLD_BATON = """
import sys, time
from torch.utils.file_baton import FileBaton
baton = FileBaton(sys.argv[1])
assert baton.try_acquire()
print("held", flush=True)
time.sleep(60)
"""

# a real JIT build of a tiny library (no torch headers, so it compiles in a second)
BUILD = """
import sys
from torch.utils.cpp_extension import load
print("loading", flush=True)
load(name="tiny_op", sources=[sys.argv[1]], is_python_module=False, verbose=False)
print("built", flush=True)
"""


def plant(root: Path, op: str) -> Path:
    """An op folder with the lock a build left behind."""
    (root / op).mkdir(parents=True, exist_ok=True)
    lock = root / op / "lock"
    lock.touch()
    return lock


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def started():
    """Processes this test starts, each in its own session; ended after the test."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            # SIGTERM first: ninja runs each command in a process group of its own and ends them on SIGTERM
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_cache_folder_is_keyed_by_the_build(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    folder = Path(default_extensions_dir())
    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    torch_version = torch.__version__.split("+")[0]
    ds = importlib.metadata.version("deepspeed")
    assert folder.parent == Path("~/.cache/tuneyard/torch_extensions").expanduser()
    assert folder.name == f"torch-{torch_version}-ds-{ds}-{accelerator}-py{sys.version_info[0]}{sys.version_info[1]}"
    assert worker_env(1)["TORCH_EXTENSIONS_DIR"] == str(folder)
    # the user's own setting wins
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    assert extensions_dir() == "/somewhere/else"
    assert worker_env(1)["TORCH_EXTENSIONS_DIR"] == "/somewhere/else"


def test_locks_of_dead_builds_are_removed_with_a_warning(tmp_path, caplog):
    root = tmp_path / "torch-x-ds-y-cpu-py311"
    locks = [plant(root, "deepspeed_shm_comm"), plant(root, "cpu_adam")]
    (root / "fused_adam").mkdir()  # a finished build: no lock, nothing to do
    with caplog.at_level(logging.WARNING, logger="tuneyard.cluster.extensions"):
        removed = clear_stale_locks(root)
    assert sorted(removed) == sorted(locks)
    assert not any(lock.exists() for lock in locks)
    for lock in locks:
        assert any(str(lock) in r.getMessage() and "no live process" in r.getMessage() for r in caplog.records)
    assert (root / "fused_adam").is_dir() and (root / "deepspeed_shm_comm").is_dir()


def test_lock_held_by_a_live_baton_is_kept(tmp_path, caplog, started):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_BATON, str(lock)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    started.append(holder)
    assert holder.stdout.readline().strip() == "held"
    with caplog.at_level(logging.WARNING, logger="tuneyard.cluster.extensions"):
        assert clear_stale_locks(tmp_path) == []
    assert lock.exists() and not caplog.records
    # the same lock past the age bound goes, held or not: a build hung that long hangs the run too
    old = time.time() - 11 * 60
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="tuneyard.cluster.extensions"):
        assert clear_stale_locks(tmp_path) == [lock]
    assert not lock.exists() and "11 min old" in caplog.text


def test_lock_of_a_running_ninja_build_is_kept(tmp_path, started):
    op = tmp_path / "cpu_adam"
    op.mkdir()
    (op / "build.ninja").write_text("rule slow\n  command = sleep 60 && touch $out\nbuild out.o: slow\n")
    lock = plant(tmp_path, "cpu_adam")
    ninja = subprocess.Popen(["ninja"], cwd=op, stdout=subprocess.DEVNULL, start_new_session=True)
    started.append(ninja)
    wait_for(lambda: Path(f"/proc/{ninja.pid}/task/{ninja.pid}/children").read_text().strip())  # it is building
    assert clear_stale_locks(tmp_path) == []
    assert lock.exists()


def test_a_stale_lock_hangs_a_real_build_until_cleared(tmp_path, started):
    source = tmp_path / "tiny.cpp"
    source.write_text('extern "C" int tiny() { return 1; }\n')
    root = tmp_path / "ext"
    plant(root, "tiny_op")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}
    command = [sys.executable, "-c", BUILD, str(source)]
    stuck = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    started.append(stuck)
    assert stuck.stdout.readline().strip() == "loading"
    time.sleep(5)  # the build takes about a second; torch's FileBaton waits on the dead build's lock instead
    assert stuck.poll() is None and not list((root / "tiny_op").glob("*.so"))
    os.killpg(stuck.pid, signal.SIGKILL)
    stuck.wait()
    assert clear_stale_locks(root) == [root / "tiny_op" / "lock"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "built" in done.stdout, done.stderr
    assert list((root / "tiny_op").glob("*.so")) and not (root / "tiny_op" / "lock").exists()


# the same build in a process that watches the cache as every worker does (worker_start.watch_start_up)
WATCHED_BUILD = """
import sys
from tuneyard.cluster.extensions import watch_extension_locks
from torch.utils.cpp_extension import load
watch_extension_locks(sys.argv[2], lambda text: print("report:", text, flush=True), every_s=0.5)
try:
    load(name="tiny_op", sources=[sys.argv[1]], is_python_module=False, verbose=False)
    print("built", flush=True)
except Exception as exc:  # the wait ended, but torch assumes the lock's owner built the op
    print("load failed:", type(exc).__name__, flush=True)
"""


def test_a_worker_watching_its_cache_is_not_held_by_a_dead_build(tmp_path, started):
    """A lock planted while the worker already waits (no driver clean-up before): the wait ends by itself,
    with a report of what it waited for, and the next attempt (training.max_failures) builds the op."""
    from tests.conftest import ROOT

    source = tmp_path / "tiny.cpp"
    source.write_text('extern "C" int tiny() { return 1; }\n')
    root = tmp_path / "ext"
    plant(root, "tiny_op")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}

    def build() -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", WATCHED_BUILD, str(source), str(root)]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)

    started_at = time.monotonic()
    first = build()
    assert time.monotonic() - started_at < 60
    assert "report: waiting for the build of torch extension 'tiny_op'" in first.stdout, first.stdout + first.stderr
    assert "held by an unknown process" in first.stdout
    assert not (root / "tiny_op" / "lock").exists()
    if "built" not in first.stdout:  # torch loads what it thinks the lock's owner built; the retry builds it
        assert "load failed" in first.stdout, first.stdout + first.stderr
        again = build()
        assert "built" in again.stdout, again.stdout + again.stderr
    assert list((root / "tiny_op").glob("*.so"))


def test_a_worker_keys_the_default_cache_by_its_own_build(monkeypatch):
    """The driver's default folder is re-keyed in the worker; a user's own TORCH_EXTENSIONS_DIR is kept."""
    from tuneyard.cluster.extensions import use_own_build_folder

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/cache/torch-2.0.0-ds-0.1-cu118-py39")
    monkeypatch.setenv("TUNEYARD_DEFAULT_EXTENSIONS_DIR", "/cache/torch-2.0.0-ds-0.1-cu118-py39")
    use_own_build_folder()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == default_extensions_dir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/mine")
    use_own_build_folder()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/mine"
    assert "TUNEYARD_DEFAULT_EXTENSIONS_DIR" not in worker_env(1)  # the user's own
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    env = worker_env(1)
    assert env["TUNEYARD_DEFAULT_EXTENSIONS_DIR"] == env["TORCH_EXTENSIONS_DIR"] == default_extensions_dir()


SECOND_PYTHON = os.environ.get("TUNEYARD_TEST_SECOND_PYTHON", "")


@pytest.mark.integration
@pytest.mark.skipif(
    not SECOND_PYTHON,
    reason="set TUNEYARD_TEST_SECOND_PYTHON to the python of a second virtualenv with another torch (CONTRIBUTING.md)",
)
def test_two_virtualenvs_with_other_torch_versions_share_one_home(tmp_path):
    """Runs from this venv (A) and a second one with another torch (B), one HOME: A, B, then A again with a
    dead build's lock planted in A's op folder. Each build keeps its own compiled op, the third run builds
    nothing (no rebuilding back and forth) and nothing waits on the lock."""
    import yaml

    from tests.conftest import PRETRAIN_JOB, ROOT, job_dict

    probe = "import torch, sys; from tuneyard.cluster.extensions import build_key; print(build_key())"
    keys = {
        name: subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
        .stdout.strip()
        .splitlines()[-1]
        for name, python in (("A", sys.executable), ("B", SECOND_PYTHON))
    }
    assert keys["A"].split("-ds-")[0] != keys["B"].split("-ds-")[0], keys  # two torch versions
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "TUNEYARD_DEFAULT_EXTENSIONS_DIR")}
    env["HOME"] = str(home)
    cache = home / ".cache" / "tuneyard" / "torch_extensions"

    def train(python: str, name: str) -> float:
        run_dir = tmp_path / name
        job = job_dict(PRETRAIN_JOB, run_dir, training={"max_steps": 2}, deepspeed={"zero_stage": 2})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(job))
        started = time.monotonic()
        proc = subprocess.run(
            [python, "-m", "tuneyard.launch.cli", "train", str(tmp_path / f"{name}.yaml")],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return time.monotonic() - started

    def built_op(key: str) -> Path:
        (library,) = (cache / key / "deepspeed_shm_comm").glob("*.so")
        return library

    first = train(sys.executable, "a1")
    built_at = built_op(keys["A"]).stat().st_mtime_ns
    second = train(SECOND_PYTHON, "b1")
    assert built_op(keys["B"]).stat().st_mtime_ns > 0
    assert sorted(p.name for p in cache.iterdir()) == sorted(keys.values())
    plant(cache / keys["A"], "deepspeed_shm_comm")  # as a killed build leaves it
    third = train(sys.executable, "a2")
    assert built_op(keys["A"]).stat().st_mtime_ns == built_at  # loaded, not rebuilt
    assert not (cache / keys["A"] / "deepspeed_shm_comm" / "lock").exists()
    print(f"A {first:.0f} s, B {second:.0f} s, A again {third:.0f} s")
