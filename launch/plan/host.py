"""What a job's worker processes ask of the one machine a local Ray runs on: CPUs, and memory from the plan.

`cluster.resources.check_local_machine` holds these against the machine's cores and free memory. Before Ray
starts, `base_demand` counts each process at its base (no model yet: cheap, no planner); before the workers
start, `local_demand` adds each one's share of model, optimizer and batch from the memory plan, the same
figures `tuneyard plan` prints for a CPU job.
"""

from __future__ import annotations

from tuneyard.cluster.resources import WORKER_BASE_BYTES, GiB, LocalDemand, demand_of
from tuneyard.launch.config import JobConfig
from tuneyard.launch.plan.job import plan_job
from tuneyard.launch.plan.memory import RankMemory, host_bytes
from tuneyard.launch.plan.shapes import Shapes
from tuneyard.launch.plan.types import Device, Hardware
from tuneyard.training.stages import stage_spec


def _held(device: Device, memory: RankMemory) -> float:
    """A rank's CPU memory beside its process's base: everything on a CPU job, else what it offloads or loads."""
    return host_bytes(memory) if device.host_per_rank is not None else memory.cpu


def _role_processes(job: JobConfig) -> dict[str, int]:
    """PPO: each present role's worker processes."""
    from tuneyard.rlhf.ppo.groups import present_roles

    return {role: getattr(job.ppo.roles, role).workers for role in present_roles(job.train_spec(), job.ppo, job.reward)}


def _role_cpus(job: JobConfig) -> tuple[float, str]:
    """PPO: the CPUs its placement group asks for, and how they add up."""
    from tuneyard.rlhf.ppo.groups import plan_placement, present_roles

    roles = present_roles(job.train_spec(), job.ppo, job.reward)
    total = plan_placement(job.ppo, roles).total("CPU")
    each = ", ".join(
        f"{r} {getattr(job.ppo.roles, r).workers} x {getattr(job.ppo.roles, r).cpus_per_worker:g}" for r in roles
    )
    return total, f"ppo.roles ({each}; colocate {job.ppo.colocate}) ask for {total:g} CPUs"


def base_demand(job: JobConfig) -> LocalDemand:
    """The job's worker processes and CPUs, each process counted at its base memory (no planner: for before Ray)."""
    if not stage_spec(job.stage).controller:
        return demand_of(job.cluster)
    processes = _role_processes(job)
    cpus, cpus_text = _role_cpus(job)
    count = sum(processes.values())
    memory = count * WORKER_BASE_BYTES
    return LocalDemand(
        processes=count,
        cpus=cpus,
        cpus_text=cpus_text,
        memory=memory,
        memory_text=f"{count} role processes x a worker's base {WORKER_BASE_BYTES / GiB:.2f} GiB = "
        f"{memory / GiB:.2f} GiB",
        processes_key="ppo.roles.*.workers",
    )


def local_demand(job: JobConfig, shapes: Shapes | None = None) -> LocalDemand:
    """The job's worker processes, CPUs and memory: each process's base plus its share from the memory plan."""
    base = base_demand(job)
    plan = plan_job(job, Hardware(nodes=1), shapes or Shapes())
    if not stage_spec(job.stage).controller:
        share = sum(_held(device, m) for device in plan.devices for _, m in device.parts)
        each = WORKER_BASE_BYTES + share
        memory = job.cluster.workers * each
        text = (
            f"cluster.workers {job.cluster.workers} x ({WORKER_BASE_BYTES / GiB:.2f} GiB a worker's base + "
            f"{share / GiB:.2f} GiB its model, optimizer and batch) = {memory / GiB:.2f} GiB"
        )
    else:
        processes = _role_processes(job)
        shares = {role: _held(device, m) for device in plan.devices for role, m in device.parts}
        memory = sum(n * (WORKER_BASE_BYTES + shares.get(role, 0.0)) for role, n in processes.items())
        terms = " + ".join(
            f"{role} {n} x {(WORKER_BASE_BYTES + shares.get(role, 0.0)) / GiB:.2f}" for role, n in processes.items()
        )
        text = (
            f"ppo.roles {terms} GiB (each a worker's base {WORKER_BASE_BYTES / GiB:.2f} GiB + its model, optimizer "
            f"and batch) = {memory / GiB:.2f} GiB"
        )
    return LocalDemand(base.processes, base.cpus, base.cpus_text, memory, text, base.processes_key)
