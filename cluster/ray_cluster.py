"""Connecting to a Ray cluster, or starting a local one bound to 127.0.0.1, for the length of a job."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from tuneyard.cluster.config import ClusterConfig
from tuneyard.cluster.errors import ClusterError
from tuneyard.cluster.extensions import clear_stale_locks, extensions_dir

if TYPE_CHECKING:
    from tuneyard.cluster.resources import LocalDemand

log = logging.getLogger(__name__)


def unreachable(host: str, port: int, timeout_s: float = 5.0) -> str | None:
    """Why nothing answers a TCP connect to host:port within `timeout_s`, or None when something does."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except TimeoutError:
        return f"no answer within {timeout_s:.0f}s"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def torch_backend(cfg: ClusterConfig) -> str:
    """nccl when the workers get GPUs, gloo otherwise."""
    return "nccl" if cfg.gpus_per_worker > 0 else "gloo"


def worker_env(cpus: float) -> dict[str, str]:
    """Environment for a worker granted `cpus` CPUs: that many BLAS threads, an extension cache per torch build.

    Each actor sets it itself (the SPMD workers before importing their entry, PPO's roles in their runtime_env):
    as the job's runtime_env it would send every actor to a fresh process instead of one Ray has prestarted.
    """
    threads = str(max(1, int(cpus)))
    env = {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "TORCH_EXTENSIONS_DIR": extensions_dir(),
    }
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):  # ours: each worker re-keys it by its own build
        env["TUNEYARD_DEFAULT_EXTENSIONS_DIR"] = env["TORCH_EXTENSIONS_DIR"]
    return env


@contextlib.contextmanager
def ray_cluster(cfg: ClusterConfig, demand: LocalDemand | None = None) -> Iterator[None]:
    """Use the Ray this process already joined, connect to `cfg.address`, or start a local Ray.

    A local Ray listens on 127.0.0.1 only and is stopped when the block ends; it offers at least the CPUs of
    `demand` (default: the workers' share), so a job sized for a laptop fits on it.
    """
    with ray_starting(cfg, demand) as wait_until_up:
        wait_until_up()
        yield


@contextlib.contextmanager
def ray_starting(cfg: ClusterConfig, demand: LocalDemand | None = None) -> Iterator[Callable[[], None]]:
    """`ray_cluster` that starts a local Ray in the background at once and yields a function waiting until it is up.

    The driver imports and checks the job meanwhile, so Ray's start-up overlaps that work. A remote cluster is
    connected to only when waited for, after the checks; nothing is placed on either before then. A local Ray
    starts only once this machine's cores and free memory can take `demand` (`resources.check_local_machine`).
    """
    import ray

    global _local_ray
    if _local_ray is not None:  # an outer block (the CLI's, before its imports) is starting it
        yield _local_ray.wait_until_up
        return
    if ray.is_initialized():
        yield lambda: None
        return
    # a build that died on this machine left a lock the workers would wait on forever; remote nodes keep
    # their own caches (or share this one over a network filesystem, where only the lock's age counts)
    clear_stale_locks(extensions_dir())
    if cfg.address:

        def connect() -> None:
            if not ray.is_initialized():
                connect_to_cluster(cfg.address)

        try:
            yield connect
        finally:
            ray.shutdown()
        return
    from tuneyard.cluster.resources import check_local_machine, demand_of

    demand = demand or demand_of(cfg)
    # a local Ray is sized to what the job asks, so nothing would refuse a job far bigger than this machine
    check_local_machine(demand, cfg.oversubscribe)
    local = LocalRay(
        num_cpus=max(os.cpu_count() or 1, int(demand.cpus + 0.999)),
        _node_ip_address="127.0.0.1",
        include_dashboard=cfg.dashboard,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
    )
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        # what ray.init does when called from it; a handler the program set itself (the CLI's) stays
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    local.start()
    _local_ray = local
    try:
        yield local.wait_until_up
    finally:
        _local_ray = None
        local.stop()


def connect_to_cluster(address: str) -> None:
    """ray.init on a running cluster, failing in seconds with what to check when it does not answer."""
    import ray

    # ray.init retries a silent address for minutes; a bad address should fail in seconds
    host, _, port = address.removeprefix("ray://").rpartition(":")
    why = unreachable(host, int(port)) if host and port.isdigit() else None
    if why:
        raise ClusterError(
            f"cannot reach the Ray cluster at cluster.address={address} ({why}); check the address "
            "(the head's GCS, host:6379 by default) and that the cluster is up"
        )
    sigterm = signal.getsignal(signal.SIGTERM)
    leave_signals_to_python()
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as exc:  # ray raises ConnectionError, TimeoutError or RuntimeError here
        raise ClusterError(
            f"cannot connect to the Ray cluster at cluster.address={address} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); check the address, that the cluster is up, "
            "and the auth token (RAY_AUTH_TOKEN or ~/.ray/auth_token)"
        ) from None
    if sigterm not in (signal.SIG_DFL, None) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)  # ray.init replaces it with sys.exit; the program's own handler stays


def leave_signals_to_python() -> None:
    """Keep Ray's C++ failure-signal handler out of this (driver) process: it takes SIGTERM from Python's handler,
    logs a stack trace and aborts the process (exit 134) before the driver has stopped its workers and said why.
    Ray's own switch for it (RAY_DISABLE_FAILURE_SIGNAL_HANDLER) is read into this constant; set here, it holds
    for the driver only, while Ray's daemons and workers keep their crash reports."""
    from ray._private import ray_constants

    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True


_local_ray: LocalRay | None = None  # the local Ray a `ray_starting` block of this process is starting or running


def local_ray_starting() -> bool:
    """Whether a `ray_starting` block of this process is starting or running a local Ray (not joining a cluster)."""
    return _local_ray is not None


class LocalRay(threading.Thread):
    """A thread that starts a local Ray (`ray.init(**init_args)`), keeps it until `stop()`, then shuts it down.

    The thread lives as long as the Ray: Ray's processes die with the thread that started them (Ray sets
    PR_SET_PDEATHSIG on them, which Linux fires when that thread ends, not the process).
    """

    def __init__(self, **init_args) -> None:
        super().__init__(name="local-ray", daemon=True)
        self.init_args = init_args
        self.up = threading.Event()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        """Start Ray, say so, wait to be stopped, shut Ray down."""
        import ray

        # ray.init sets its SIGTERM handler from the main thread only, and warns here; `ray_starting` sets it
        ray_log = logging.getLogger("ray._private.worker")
        ray_log.addFilter(sigterm_warning := lambda record: "SIGTERM handler is not set" not in record.getMessage())
        try:
            leave_signals_to_python()
            ray.init(**self.init_args)
            log.info("started a local Ray on 127.0.0.1")
        except BaseException as exc:  # handed to the driver's thread by wait_until_up
            self.error = exc
            return
        finally:
            ray_log.removeFilter(sigterm_warning)
            self.up.set()
        self.stopping.wait()
        ray.shutdown()

    def wait_until_up(self) -> None:
        """Block until Ray is up; raise what ray.init raised."""
        self.up.wait()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Shut Ray down (after it finished starting) and wait for it."""
        self.stopping.set()
        self.join()
