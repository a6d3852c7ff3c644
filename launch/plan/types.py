"""The planner's records: the hardware a plan is for, a GPU and what shares it, a job's plan, a suggested change.

Every other module of the planner imports these; this one imports none of them (only memory.py's RankMemory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneyard.launch.plan.memory import RankMemory


@dataclass(frozen=True)
class Hardware:
    """The machines a plan is made for; None: taken from the job (cluster.workers) or not checked."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    gpu_memory: int | None = None  # bytes of one GPU
    cpu_memory: int | None = None  # bytes of one node


@dataclass
class Device:
    """One GPU: what each rank sharing it holds, and how many GPUs like it one node has."""

    name: str
    parts: list[tuple[str, RankMemory]]
    per_node: int = 1
    host_per_rank: float | None = None  # a CPU job: the CPU bytes of one rank's processes (their base included)

    @property
    def gpu(self) -> float:
        """Bytes on this GPU."""
        return sum(memory.gpu for _, memory in self.parts)

    @property
    def cpu(self) -> float:
        """Bytes of CPU memory a node needs for its GPUs like this one (offloaded states, or loading); a CPU job's
        ranks hold everything there."""
        if self.host_per_rank is not None:
            return self.host_per_rank * self.per_node
        return sum(memory.cpu for _, memory in self.parts) * self.per_node


@dataclass
class JobPlan:
    """The devices of a job with their figures, the memory they have, and what the job is."""

    devices: list[Device]
    hardware: Hardware
    summary: list[str] = field(default_factory=list)

    @property
    def on_cpu(self) -> bool:
        """A job that trains on CPUs only: its figures are CPU memory."""
        return all(d.host_per_rank is not None for d in self.devices)

    @property
    def peak_gpu(self) -> float:
        """The fullest GPU's bytes."""
        return max(d.gpu for d in self.devices)

    @property
    def peak_cpu(self) -> float:
        """The fullest node's CPU bytes (a CPU job: every device's ranks share the node)."""
        if self.on_cpu:
            return sum(d.cpu for d in self.devices)
        return max(d.cpu for d in self.devices)

    @property
    def gpu_fits(self) -> bool:
        """Every GPU holds its figures (True when the GPU memory is unknown, or the job has no GPU)."""
        return self.on_cpu or self.hardware.gpu_memory is None or self.peak_gpu <= self.hardware.gpu_memory

    @property
    def cpu_fits(self) -> bool:
        """Every node's CPU memory holds its figures (True when it is unknown)."""
        return self.hardware.cpu_memory is None or self.peak_cpu <= self.hardware.cpu_memory

    @property
    def fits(self) -> bool:
        """GPU and CPU both fit."""
        return self.gpu_fits and self.cpu_fits


@dataclass
class Suggestion:
    """A change to the job (as `key=value` overrides) and the plan it leads to."""

    overrides: list[str]
    plan: JobPlan

    @property
    def text(self) -> str:
        """The overrides as one would type them after `tuneyard train JOB.yaml`."""
        return " ".join(self.overrides)
