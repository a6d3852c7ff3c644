"""Whether the Ray cluster can host the SPMD workers a job asks for, checked before their placement group waits on them.

The worker group places `cluster.workers` bundles of {CPU: cpus_per_worker, GPU: gpus_per_worker} and waits, without
end or message, until they fit. A request that can never fit is refused here with the arithmetic instead.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tuneyard.cluster.config import ClusterConfig
from tuneyard.cluster.errors import ClusterError

KEYS = {"CPU": "cluster.cpus_per_worker", "GPU": "cluster.gpus_per_worker"}
EPS = 1e-9  # Ray keeps fractional resources to 1e-4; sums of floats must not miss an exact fit


@dataclass(frozen=True)
class Shortfall:
    """Why the workers do not fit: a short 'need X, have Y' and the whole paragraph with the fix."""

    short: str
    message: str


def _nodes_text(nodes: list[dict[str, float]], resource: str, limit: int = 8) -> str:
    """'1 node: 2' / '3 nodes: 8, 8, 4' / '40 nodes: 8, 8, ... (+32 more)'."""
    amounts = [f"{node.get(resource, 0.0):g}" for node in nodes]
    shown = ", ".join(amounts[:limit]) + (f", ... (+{len(amounts) - limit} more)" if len(amounts) > limit else "")
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: {shown}"


def _fix(resource: str, have_any: bool) -> str:
    """How to make the request fit."""
    if resource == "GPU" and not have_any:
        return (
            "this Ray cluster has no GPUs: set cluster.gpus_per_worker: 0 to train on CPUs, or give "
            "cluster.address of a cluster with GPUs"
        )
    return f"lower cluster.workers or {KEYS[resource]}, or give cluster.address of a bigger Ray cluster"


def _fits_on(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many worker bundles one node can hold."""
    return min(math.floor(node.get(r, 0.0) / amount + EPS) for r, amount in bundle.items())


def shortfall(
    workers: int, cpus_per_worker: float, gpus_per_worker: float, placement: str, nodes: list[dict[str, float]]
) -> Shortfall | None:
    """Why `workers` bundles do not fit on nodes with these total resources, or None when they do."""
    bundle = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker > 0 else {})}
    for resource, per in bundle.items():
        asked, have = workers * per, sum(node.get(resource, 0.0) for node in nodes)
        if asked > have + EPS:
            return Shortfall(
                f"need {asked:g} {resource}s, have {have:g}",
                f"cluster.workers {workers} x {KEYS[resource]} {per:g} = {asked:g} {resource}s, but the Ray "
                f"cluster has {have:g} {resource}s ({_nodes_text(nodes, resource)}); {_fix(resource, have > 0)}",
            )
        largest = max((node.get(resource, 0.0) for node in nodes), default=0.0)
        if per > largest + EPS:
            return Shortfall(
                f"need a node with {per:g} {resource}s, largest has {largest:g}",
                f"one worker asks for {KEYS[resource]} {per:g} {resource}s, but no node of the Ray cluster has that "
                f"many ({_nodes_text(nodes, resource)}): a worker runs on one node; lower {KEYS[resource]} "
                "(and raise cluster.workers), or give cluster.address of a cluster with bigger nodes",
            )
    each = " + ".join(f"{amount:g} {r}" for r, amount in bundle.items())
    per_node = [_fits_on(node, bundle) for node in nodes]
    if placement == "strict_spread":
        hosts = sum(1 for n in per_node if n > 0)
        if hosts < workers:
            return Shortfall(
                f"need {workers} nodes, have {hosts}",
                f"cluster.placement strict_spread puts each of the cluster.workers {workers} on its own node, but "
                f"only {hosts} of the Ray cluster's {len(nodes)} nodes can hold a worker ({each}); lower "
                "cluster.workers, set cluster.placement: pack, or give cluster.address of a cluster with more nodes",
            )
    elif sum(per_node) < workers:
        fits = ", ".join(str(n) for n in per_node[:8]) + (", ..." if len(per_node) > 8 else "")
        return Shortfall(
            f"need room for {workers} workers, have {sum(per_node)}",
            f"cluster.workers {workers} of {each} each do not fit: the Ray cluster's nodes hold {fits} "
            f"such workers ({sum(per_node)} in all), as a worker cannot straddle nodes; lower cluster.workers, "
            "or size cluster.cpus_per_worker / cluster.gpus_per_worker to divide the nodes' resources",
        )
    return None


def check_request(
    workers: int, cpus_per_worker: float, gpus_per_worker: float, placement: str, nodes: list[dict[str, float]]
) -> None:
    """Raise ClusterError, with the arithmetic, when the workers can never fit on these nodes."""
    found = shortfall(workers, cpus_per_worker, gpus_per_worker, placement, nodes)
    if found is not None:
        raise ClusterError(found.message)


def ray_nodes() -> list[dict[str, float]]:
    """The total resources of each live node of the Ray cluster this process joined."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def _print_line(line: str) -> None:
    """A countdown line on stderr (whole lines: the progress line redraws itself in place on stdout)."""
    print(line, file=sys.stderr, flush=True)


def wait_for_resources(
    cfg: ClusterConfig,
    read_nodes: Callable[[], list[dict[str, float]]] = ray_nodes,
    notify: Callable[[str], None] = _print_line,
    poll_s: float = 5.0,
) -> None:
    """Return once `cfg`'s workers fit on the Ray cluster; else raise ClusterError with the arithmetic.

    A cluster given by `cfg.address` may be autoscaling: with `cluster.start_timeout_s` > 0 it gets that long
    to grow (one countdown line per poll). A local Ray never grows, so it is refused at once.
    """
    timeout_s = cfg.start_timeout_s if cfg.address else 0.0
    deadline = time.monotonic() + timeout_s
    while True:
        found = shortfall(cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker, cfg.placement, read_nodes())
        if found is None:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            break
        notify(f"waiting for resources: {found.short} ... {left:.0f} s left (cluster.start_timeout_s)")
        time.sleep(min(poll_s, left))
    if cfg.address and cfg.start_timeout_s == 0:
        hint = "; an autoscaling cluster can be given time to add nodes with cluster.start_timeout_s (seconds)"
    elif cfg.address:
        hint = f" (still, after waiting cluster.start_timeout_s {cfg.start_timeout_s:g} s for the cluster to grow)"
    else:
        hint = ""
    raise ClusterError(found.message + hint)


# ------------------------------------------------------------------------------------------------ a local Ray

# CPUs a local job may ask per core of this machine before it has to say cluster.oversubscribe: true
OVERSUBSCRIBE_FACTOR = 2
# Memory one worker process holds beside its model, optimizer and batch: Python, torch, transformers, TRL,
# DeepSpeed's engine, gloo and Ray's worker runtime. Measured: 2-worker pretrain workers of the 0.1M-parameter tiny
# model (shares under 0.01 GiB) peaked at 0.45-0.58 GiB of private memory (USS) each, 0.65-0.78 GiB resident.
WORKER_BASE_BYTES = 2**29  # 0.5 GiB
GiB = 2**30


@dataclass(frozen=True)
class LocalDemand:
    """What a job asks of the machine a local Ray runs on: worker processes, CPUs and memory, with their sums."""

    processes: int
    cpus: float
    cpus_text: str  # how the CPUs add up, e.g. "cluster.workers 64 x cluster.cpus_per_worker 1 = 64 CPUs"
    memory: float  # bytes all the worker processes need
    memory_text: str  # how the memory adds up, e.g. "cluster.workers 64 x a worker's base 0.50 GiB = 32.00 GiB"
    processes_key: str = "cluster.workers"


def demand_of(cfg: ClusterConfig) -> LocalDemand:
    """An SPMD job's demand from its cluster section alone (each worker counted at its base memory)."""
    asked, memory = cfg.workers * cfg.cpus_per_worker, cfg.workers * WORKER_BASE_BYTES
    return LocalDemand(
        processes=cfg.workers,
        cpus=asked,
        cpus_text=f"cluster.workers {cfg.workers} x cluster.cpus_per_worker {cfg.cpus_per_worker:g} = {asked:g} CPUs",
        memory=memory,
        memory_text=f"cluster.workers {cfg.workers} x a worker's base {WORKER_BASE_BYTES / GiB:.2f} GiB = "
        f"{memory / GiB:.2f} GiB",
    )


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def free_memory() -> int:
    """Bytes of memory this machine can still give: MemAvailable, or less under a cgroup's memory limit."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:  # cgroup v2: the limit of this process's group, less what the group already uses
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return free


def local_shortfall(demand: LocalDemand, oversubscribe: bool, cores: int, free: float) -> str | None:
    """Why a local Ray on this machine cannot host the job (the paragraph with the arithmetic), or None."""
    allowed = OVERSUBSCRIBE_FACTOR * cores
    if demand.cpus > allowed + EPS and not oversubscribe:
        return (
            f"{demand.cpus_text}, but this machine has {cores} cores, and a local Ray takes at most "
            f"{OVERSUBSCRIBE_FACTOR} CPUs per core ({allowed}): each CPU asked for would be {cores / demand.cpus:.2f} "
            f"of a core and the machine would thrash. Lower {demand.processes_key} (or the CPUs per worker), give "
            "cluster.address of a bigger Ray cluster, or set cluster.oversubscribe: true to run it anyway"
        )
    if demand.memory > free:
        fits = int(free // (demand.memory / demand.processes))
        return (
            f"{demand.memory_text} of memory, but this machine has {free / GiB:.2f} GiB free (MemAvailable, within "
            f"any cgroup limit): room for about {fits} of the {demand.processes} worker processes. Lower "
            f"{demand.processes_key} (or what each worker holds: training.batch_size, ZeRO-3 to split the model), "
            "free some memory, or give cluster.address of a Ray cluster with more"
        )
    return None


def check_local_machine(demand: LocalDemand, oversubscribe: bool) -> None:
    """Raise ClusterError, with the arithmetic, when this machine cannot host the job's workers on a local Ray."""
    found = local_shortfall(demand, oversubscribe, machine_cores(), free_memory())
    if found is not None:
        raise ClusterError(found)
