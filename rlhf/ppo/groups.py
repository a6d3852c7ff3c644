"""Placing the PPO roles: one placement group, bundles shared by colocated roles, a Ray actor per rank.

`ppo.colocate: none` gives every rank of every role a bundle of its own. `all` puts rank i of every
role into bundle i, each actor asking for a fraction of the bundle, as OpenRLHF colocates;
`policy_reference` shares bundles between those two roles only. `cluster.placement` is the
placement group's strategy (spread puts one role's ranks on different nodes where it can).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tuneyard.cluster.config import ClusterConfig
from tuneyard.cluster.ray_cluster import ClusterError, worker_env
from tuneyard.cluster.worker_group import end_actors_and_group, wait_for_placement
from tuneyard.rlhf.config import PpoSection, RewardSection, RoleSection
from tuneyard.rlhf.ppo.batches import split_rows
from tuneyard.training.config import TrainSpec
from tuneyard.training.run_dir import last_sign_of

ROLE_ORDER = ("policy", "critic", "reference", "reward", "rollout")


@dataclass
class RoleSeat:
    """Where one rank of a role is to sit: its bundle of the placement group and the share of it the actor asks for."""

    bundle: int
    cpus: float
    gpus: float


@dataclass
class Placement:
    """The bundles of the placement group and the seats of each present role's ranks."""

    bundles: list[dict[str, float]] = field(default_factory=list)
    seats: dict[str, list[RoleSeat]] = field(default_factory=dict)

    def total(self, resource: str) -> float:
        """How much of a resource (CPU, GPU) the whole placement group holds."""
        return sum(b.get(resource, 0.0) for b in self.bundles)


def colocated_sets(colocate: str, roles: list[str]) -> list[list[str]]:
    """The roles that share bundles, as groups (a role alone is a group of one)."""
    if colocate == "all":
        return [roles]
    if colocate == "policy_reference" and "reference" in roles:
        return [["policy", "reference"], *[[r] for r in roles if r not in ("policy", "reference")]]
    return [[r] for r in roles]


def present_roles(spec: TrainSpec, ppo: PpoSection, reward: RewardSection) -> list[str]:
    """The roles that run as actors: no critic for a group estimator, no reference for an adapter policy (its base
    with the adapter off is the reference), no reward actor without a reward model, rollout engines only when
    vLLM generates."""
    absent = {
        "critic": not ppo.has_critic,
        "reference": spec.peft.method in ("lora", "qlora"),
        "reward": not reward.model,
        "rollout": ppo.generation.engine != "vllm",
    }
    return [role for role in ROLE_ORDER if not absent.get(role, False)]


def plan_placement(ppo: PpoSection, roles: list[str]) -> Placement:
    """Bundles and seats for the roles that run as actors (in ROLE_ORDER).

    Colocated roles share bundles: rank i of each sits in the set's bundle i, which holds the most
    any of them asks for, and each asks for its share of it (a role with fewer ranks uses the first bundles).
    """
    placement = Placement()
    for together in colocated_sets(ppo.colocate, roles):
        sections: dict[str, RoleSection] = {r: getattr(ppo.roles, r) for r in together}
        first = len(placement.bundles)
        for i in range(max(s.workers for s in sections.values())):
            at_rank = [s for s in sections.values() if s.workers > i]
            gpus = max(s.gpus_per_worker for s in at_rank)
            placement.bundles.append(
                {"CPU": max(s.cpus_per_worker for s in at_rank), **({"GPU": gpus} if gpus else {})}
            )
        for role, section in sections.items():
            placement.seats[role] = []
            for i in range(section.workers):
                share = sum(1 for s in sections.values() if s.workers > i)
                seat = RoleSeat(first + i, section.cpus_per_worker / share, section.gpus_per_worker / share)
                placement.seats[role].append(seat)
    return placement


def wait_until_fits(placement: Placement, ppo: PpoSection, wait_s: float = 30.0) -> None:
    """`check_fits` against the Ray cluster's free resources, giving a job that is ending a moment to free them."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return check_fits(placement, ray.available_resources(), ppo)
        except ClusterError:
            if time.monotonic() > deadline:
                raise
            check_fits(placement, ray.cluster_resources(), ppo)  # more than the cluster holds: no use waiting
            time.sleep(0.5)


def check_fits(placement: Placement, available: dict[str, float], ppo: PpoSection) -> None:
    """Refuse, with the arithmetic, roles that ask for more CPUs or GPUs than the Ray cluster has."""
    for resource in ("CPU", "GPU"):
        asked = placement.total(resource)
        have = available.get(resource, 0.0)
        if asked <= have + 1e-9:
            continue
        key = "cpus_per_worker" if resource == "CPU" else "gpus_per_worker"
        terms = " + ".join(
            f"{role} {len(seats)} x {getattr(getattr(ppo.roles, role), key):g}"
            for role, seats in placement.seats.items()
        )
        shared = f" (colocate: {ppo.colocate} shares bundles)" if ppo.colocate != "none" else ""
        raise ClusterError(
            f"the PPO roles ask for {asked:g} {resource}s ({terms}{shared}) but the Ray cluster has {have:g}; "
            f"lower ppo.roles.*.workers or ppo.roles.*.{key}, set ppo.colocate: all, or use a bigger cluster"
        )


def role_env(seat: RoleSeat) -> dict[str, str]:
    """The environment of a role's actor: `worker_env` with one thread per CPU of its own seat."""
    # the role's ppo.roles.<role>.cpus_per_worker (its share when colocated), not the SPMD workers' cluster setting
    return worker_env(seat.cpus)


class RoleStalled(RuntimeError):
    """Some ranks of a role answered a call and the others stayed silent past the collective timeout."""


@dataclass
class RoleGroup:
    """The Ray actors of one role, rank order; calls go to every rank at once."""

    name: str
    actors: list
    run_dir: Path
    timeout_s: float = 1800.0  # cluster.collective_timeout_s

    def call(self, method: str, per_rank_args: list[tuple]) -> list:
        """`method(*args)` on each rank with its own arguments; the ObjectRefs, rank order."""
        return [getattr(a, method).remote(*args) for a, args in zip(self.actors, per_rank_args, strict=True)]

    def broadcast(self, method: str, *args) -> list:
        """`method(*args)` on every rank; the ObjectRefs, rank order."""
        return [getattr(a, method).remote(*args) for a in self.actors]

    def scatter(self, method: str, batch: dict) -> list:
        """`method(shard)` on each rank with its equal, consecutive share of the batch's rows."""
        return self.call(method, [(shard,) for shard in split_rows(batch, len(self.actors))])

    def results(self, refs: list) -> list:
        """The answers to one call on every rank (`ray.get`), or RoleStalled naming the ranks that never answered.

        The ranks of a role work in step (their calls meet in collectives), so once one rank has
        answered, a rank still silent `timeout_s` later is stuck: waiting on would hang the run. A rank
        whose own collective timed out while others are silent is reported the same way.
        """
        import ray

        pending, answered_at = list(refs), None
        while pending:
            wait_s = None if answered_at is None else max(0.0, answered_at + self.timeout_s - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            if not done:
                break
            answered_at = answered_at or time.monotonic()
            try:
                ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                if pending and "timed out" in str(exc).lower():
                    lines = [x for x in str(exc).splitlines() if "timed out" in x.lower()]
                    rank = refs.index(done[0])
                    raise RoleStalled(
                        f"{self.name} rank {rank} timed out in a collective ({lines[0].strip()[:200]}); "
                        + self.silence(refs, pending)
                    ) from None
                raise
        if pending:
            answered = [i for i, ref in enumerate(refs) if ref not in pending]
            raise RoleStalled(
                f"{self.name} rank(s) {', '.join(map(str, answered))} answered and the rest stayed silent for "
                f"cluster.collective_timeout_s ({self.timeout_s:g} s); " + self.silence(refs, pending)
            )
        return ray.get(refs)

    def silence(self, refs: list, pending: list) -> str:
        """The ranks whose calls are `pending`: their last sign of life and their logs."""
        parts = []
        for rank in (refs.index(ref) for ref in pending):
            sign = last_sign_of(self.run_dir, rank, role=self.name)
            log_path = self.run_dir / "logs" / f"{self.name}-{rank}.log"
            parts.append(
                f"{self.name} rank {rank} did not arrive ("
                + (f"its last sign: {sign}; " if sign else "")
                + f"log: {log_path})"
            )
        return "; ".join(parts)


@contextlib.contextmanager
def start_role_groups(
    placement: Placement,
    classes: dict[str, type],
    cluster: ClusterConfig,
    actor_args: dict[str, tuple],
    run_dir: Path,
    role_envs: dict[str, dict[str, str]] | None = None,
) -> Iterator[dict[str, RoleGroup]]:
    """Create the placement group and every role's actors, set the groups up in parallel; remove all after.

    The placement group's strategy is `cluster.placement`; each group's collectives wait up to
    `cluster.collective_timeout_s` for a rank. `role_envs` adds variables to one role's actors' environment.
    """
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group(placement.bundles, strategy=cluster.placement.upper())
    groups: dict[str, RoleGroup] = {}
    try:
        wait_for_placement(
            group,
            cluster,
            f"the PPO placement group ({len(placement.bundles)} bundles: {placement.bundles})",
            "a bundle must fit on one node: lower ppo.roles.*.cpus_per_worker/gpus_per_worker",
        )
        for role, seats in placement.seats.items():
            # a role whose methods run beside each other names its concurrency groups (the engines' `interrupt`)
            concurrency = getattr(classes[role], "concurrency_groups", None)
            remote = (
                ray.remote(concurrency_groups=concurrency)(classes[role]) if concurrency else ray.remote(classes[role])
            )
            actors = [
                remote.options(
                    num_cpus=seat.cpus,
                    num_gpus=seat.gpus,
                    # before the role's module imports torch
                    runtime_env={"env_vars": role_env(seat) | (role_envs or {}).get(role, {})},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=group, placement_group_bundle_index=seat.bundle
                    ),
                ).remote(rank, len(seats), *actor_args[role])
                for rank, seat in enumerate(seats)
            ]
            groups[role] = RoleGroup(role, actors, run_dir, cluster.collective_timeout_s)
        addresses = {role: ray.get(g.actors[0].rendezvous_address.remote()) for role, g in groups.items()}
        timeout = cluster.collective_timeout_s
        ray.get([ref for role, g in groups.items() for ref in g.broadcast("setup", addresses[role], timeout)])
        yield groups
    finally:
        end_actors_and_group([actor for g in groups.values() for actor in g.actors], group)
