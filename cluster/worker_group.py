"""A job's SPMD workers as plain Ray actors: one placement group, one torch process group, one entry function.

The workers run in the processes Ray prestarts, so none waits for a new Python process to start. No runtime_env
is set for them or for the job: any runtime_env sends actors to freshly started processes. Ray Train is not used:
its controller, coordinator and cleaner actors add start-up time on a small machine. Each worker sets its
environment (`worker_env`, the torchrun variables) itself, before importing its entry.

The group does what the job needs of Ray Train, no more: bundles of {CPU, GPU} placed PACK or SPREAD, ranks
ordered so one node's ranks are consecutive, the torchrun variables (RANK, LOCAL_RANK, WORLD_SIZE, ...), the
node's GPUs visible to each of its workers (as Ray Train and torchrun do, so `cuda:LOCAL_RANK` is the worker's
own GPU and NCCL sees its peers), a process group with the job's backend and collective timeout, and every
failed rank's error when a run fails.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from tuneyard.cluster.config import ClusterConfig
from tuneyard.cluster.ray_cluster import ClusterError, torch_backend, worker_env

FAILURE_GRACE_S = 3.0  # after one rank fails, how long its peers get to fail too (a lost partner ends a collective)


class WorkersFailed(RuntimeError):
    """Some ranks of the group failed; `worker_failures` maps each failed rank to its error."""

    def __init__(self, worker_failures: dict[int, BaseException]):
        self.worker_failures = worker_failures
        ranks = ", ".join(str(rank) for rank in sorted(worker_failures))
        super().__init__(f"worker rank(s) {ranks} failed")


def free_port(host: str) -> int:
    """A TCP port free on `host` now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def join_process_group(
    rank: int, world_size: int, local_rank: int, address: str, backend: str, timeout_s: float
) -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, then join the process group meeting at `address`.

    The variables go into the environment because DeepSpeed and accelerate read them there (MASTER_ADDR on several
    nodes). A process already in a group stays in it.
    """
    import torch.distributed as dist

    host, _, port = address.removeprefix("tcp://").rpartition(":")
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank), MASTER_ADDR=host, MASTER_PORT=port
    )
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method=address, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )


def rendezvous_address() -> str:
    """tcp://ip:port on this Ray worker's node, where a process group's ranks meet (asked of its rank 0)."""
    import ray

    ip = ray.util.get_node_ip_address()
    return f"tcp://{ip}:{free_port(ip)}"


class SpmdWorker:
    """One rank of the group: says where Ray placed it, then joins the process group and runs the entry function."""

    def where(self) -> tuple[str, str, list[str]]:
        """(node id, node IP, the GPU ids Ray gave this worker)."""
        import ray

        context = ray.get_runtime_context()
        return (
            context.get_node_id(),
            ray.util.get_node_ip_address(),
            [str(g) for g in context.get_accelerator_ids()["GPU"]],
        )

    def rendezvous_address(self) -> str:
        """tcp://ip:port on this worker's node (asked of rank 0), where the ranks meet."""
        return rendezvous_address()

    def run(
        self,
        entry: str,
        payload: dict,
        env: dict[str, str],
        address: str,
        backend: str,
        timeout_s: float,
        absent: tuple[str, ...] = (),
    ) -> None:
        """Set the torchrun variables, join the process group, run `entry` ("module:function") with payload and rank.

        The entry's module is imported here, after CUDA_VISIBLE_DEVICES is set: torch reads it once, at its
        first CUDA call. The packages in `absent` cannot be imported in this process, as if not installed.
        """
        os.environ.update(env)  # before the entry's module imports torch: its thread pools and visible GPUs
        for package in absent:
            sys.modules.setdefault(package, None)  # None in sys.modules is how Python refuses an import
        module, _, name = entry.partition(":")
        function: Callable[[dict, int], None] = getattr(importlib.import_module(module), name)
        import torch.distributed as dist

        rank = int(env["RANK"])
        join_process_group(rank, int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), address, backend, timeout_s)
        try:
            function(payload, rank)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


@dataclass(frozen=True)
class PlacedWorker:
    """A started worker actor and where Ray placed it: its node and the GPU ids Ray gave it."""

    actor: object
    node_id: str
    node_ip: str
    gpus: list[str]


def rank_environments(workers: list[PlacedWorker], common: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The torchrun variables of each rank (workers in rank order) over `common`: one node's ranks share its GPUs."""
    nodes = list(dict.fromkeys(worker.node_id for worker in workers))
    environments = []
    for rank, worker in enumerate(workers):
        local = [w for w in workers if w.node_id == worker.node_id]
        env = {
            **(common or {}),
            "RANK": str(rank),
            "WORLD_SIZE": str(len(workers)),
            "LOCAL_RANK": str(local.index(worker)),
            "LOCAL_WORLD_SIZE": str(len(local)),
            "NODE_RANK": str(nodes.index(worker.node_id)),
        }
        node_gpus = sorted({g for w in local for g in w.gpus}, key=gpu_order)
        if node_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
        environments.append(env)
    return environments


def gpu_order(gpu: str) -> tuple[int, str]:
    """Sort key of a GPU id: "10" after "9"."""
    return (len(gpu), gpu)


def order_ranks(workers: list[PlacedWorker], driver_ip: str) -> list[PlacedWorker]:
    """Ranks in node order (the driver's node first), one node's ranks consecutive and in the order of their GPUs.

    With one GPU per worker, `cuda:LOCAL_RANK` among the node's visible GPUs is then the worker's own.
    """
    nodes = sorted({(w.node_ip != driver_ip, w.node_ip, w.node_id) for w in workers})
    node_of = {node_id: index for index, (_, _, node_id) in enumerate(nodes)}
    return sorted(workers, key=lambda w: (node_of[w.node_id], [gpu_order(g) for g in w.gpus]))


def run_spmd_workers(entry: str, payload: dict, cluster: ClusterConfig, absent: tuple[str, ...] = ()) -> None:
    """Run `entry(payload, rank)` on `cluster.workers` Ray actors in one process group; WorkersFailed if any fails.

    The packages in `absent` are kept out of the workers: ones their imports would load but the job never calls.

    When a rank fails, its peers get FAILURE_GRACE_S to fail as well, then every worker is ended and the
    failures are raised together.
    """
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": cluster.cpus_per_worker, **({"GPU": cluster.gpus_per_worker} if cluster.gpus_per_worker else {})}
    group = placement_group([bundle] * cluster.workers, strategy=cluster.placement.upper())
    actors: list = []
    try:
        wait_for_placement(
            group,
            cluster,
            f"the workers' placement group ({cluster.workers} x {bundle}, {cluster.placement})",
            "a bundle must fit on one node: lower cluster.cpus_per_worker/gpus_per_worker",
        )
        remote = ray.remote(SpmdWorker)
        actors = [
            remote.options(
                num_cpus=cluster.cpus_per_worker,
                num_gpus=cluster.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=index
                ),
            ).remote()
            for index in range(cluster.workers)
        ]
        places = ray.get([actor.where.remote() for actor in actors])
        placed = [PlacedWorker(actor, *place) for actor, place in zip(actors, places, strict=True)]
        placed = order_ranks(placed, ray.util.get_node_ip_address())
        address = ray.get(placed[0].actor.rendezvous_address.remote())
        refs = [
            worker.actor.run.remote(
                entry, payload, env, address, torch_backend(cluster), cluster.collective_timeout_s, absent
            )
            for worker, env in zip(placed, rank_environments(placed, worker_env(cluster.cpus_per_worker)), strict=True)
        ]
        wait_for_ranks(refs)
    finally:
        end_actors_and_group(actors, group)


def wait_for_placement(group, cluster: ClusterConfig, description: str, fix: str) -> None:
    """Wait until Ray has placed `group`; ClusterError after `cluster.start_timeout_s` (at least 60 s)."""
    import ray

    wait_s = max(60.0, cluster.start_timeout_s)
    try:
        ray.get(group.ready(), timeout=wait_s)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(
            f"{description} found no room on the Ray cluster's nodes within {wait_s:.0f}s although the cluster has "
            f"the resources in total; {fix}, or set cluster.start_timeout_s for an autoscaling cluster"
        ) from None


def end_actors_and_group(actors: list, group) -> None:
    """Kill the actors and remove their placement group, waiting (up to 30 s) until its resources are free."""
    import ray
    from ray.util.placement_group import placement_group_table, remove_placement_group

    for actor in actors:
        ray.kill(actor)
    remove_placement_group(group)
    # removal is asynchronous: a job that starts next on this Ray would find the CPUs still held
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and placement_group_table(group).get("state") != "REMOVED":
        time.sleep(0.1)


def wait_for_ranks(refs: list) -> None:
    """Wait for every rank's run; on a failure, give the others FAILURE_GRACE_S and raise WorkersFailed."""
    import ray

    pending, failures, failed_at = list(refs), {}, None
    while pending:
        # short waits keep Ctrl-C (KeyboardInterrupt in this, the main thread) prompt
        done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
        for ref in done:
            try:
                ray.get(ref)
            except Exception as exc:  # a raised error (RayTaskError) or a dead worker (ActorDiedError)
                cause = getattr(exc, "cause", None)  # the worker's own exception, as it raised it
                failures[refs.index(ref)] = cause if isinstance(cause, BaseException) else exc
                failed_at = failed_at or time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
            break
    if failures:
        raise WorkersFailed(failures)
