"""Connecting to a Ray cluster, or starting a local one bound to 127.0.0.1, for the length of a job."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

from cluster.config import ClusterConfig
from cluster.extensions import clear_stale_locks, extensions_dir

log = logging.getLogger(__name__)


class ClusterError(Exception):
    """The cluster cannot be reached or cannot host the job; the message says what to change."""


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


def worker_env(cfg: ClusterConfig) -> dict[str, str]:
    """Environment for each worker: one BLAS thread pool per granted CPU, an extension cache per torch build."""
    threads = str(max(1, int(cfg.cpus_per_worker)))
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
def ray_cluster(cfg: ClusterConfig, cpus_needed: float | None = None) -> Iterator[None]:
    """Use the Ray this process already joined, connect to `cfg.address`, or start a local Ray.

    A local Ray listens on 127.0.0.1 only and is stopped when the block ends; it offers at least
    `cpus_needed` CPUs (default: the workers' share), so a job sized for a laptop fits on it.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    env = {"env_vars": worker_env(cfg)}
    # a build that died on this machine left a lock the workers would wait on forever; remote nodes keep
    # their own caches (or share this one over a network filesystem, where only the lock's age counts)
    clear_stale_locks(env["env_vars"]["TORCH_EXTENSIONS_DIR"])
    if cfg.address:
        # ray.init retries a silent address for minutes; a bad address should fail in seconds
        host, _, port = cfg.address.removeprefix("ray://").rpartition(":")
        why = unreachable(host, int(port)) if host and port.isdigit() else None
        if why:
            raise ClusterError(
                f"cannot reach the Ray cluster at cluster.address={cfg.address} ({why}); check the address "
                "(the head's GCS, host:6379 by default) and that the cluster is up"
            )
        try:
            ray.init(address=cfg.address, log_to_driver=False, runtime_env=env)
        except Exception as exc:  # ray raises ConnectionError, TimeoutError or RuntimeError here
            raise ClusterError(
                f"cannot connect to the Ray cluster at cluster.address={cfg.address} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); check the address, that the cluster is up, "
                "and the auth token (RAY_AUTH_TOKEN or ~/.ray/auth_token)"
            ) from None
    else:
        needed = cpus_needed if cpus_needed is not None else cfg.workers * cfg.cpus_per_worker
        ray.init(
            num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
            _node_ip_address="127.0.0.1",
            include_dashboard=cfg.dashboard,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            runtime_env=env,
        )
        log.info("started a local Ray on 127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()
