"""The `cluster` job section: where the workers run and what each one gets."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
SIZE_UNITS |= {"t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | float) -> int:
    """Bytes of a memory size such as `80GiB`, `80GB`, `512G` or a plain number of bytes; ValueError otherwise."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"'{text}' is not a memory size; write it like 80GiB, 80GB or 512G")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


class ClusterConfig(BaseModel):
    """A Ray address (or none: a local Ray on 127.0.0.1) and the per-worker resources."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(default=None, description="ray://host:port or host:port; none starts a local Ray")
    workers: int = Field(default=1, ge=1, description="training workers (ranks), one Ray actor each")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs each worker asks Ray for")
    gpus_per_worker: float = Field(
        default=0.0, ge=0, description="GPUs each worker asks for; > 0 selects NCCL, else gloo"
    )
    dashboard: bool = Field(default=False, description="local Ray only; bound to 127.0.0.1")
    placement: Literal["pack", "spread", "strict_spread"] = Field(
        default="pack", description="workers on as few nodes as fit (pack), spread, or one per node (strict_spread)"
    )
    start_timeout_s: float = Field(
        default=0.0,
        ge=0,
        description="with cluster.address: seconds an autoscaling cluster gets to fit the workers; 0 fails at once",
    )
    collective_timeout_s: float = Field(
        default=1800.0, gt=0, description="how long a collective (all-reduce, barrier) waits for every rank"
    )
    oversubscribe: bool = Field(
        default=False,
        description="local Ray only: let the workers ask for more CPUs than twice this machine's cores",
    )
    gpu_memory: str | None = Field(
        default=None, description="memory of one GPU (80GiB) for the memory plan; none: the visible GPU's"
    )
    cpu_memory: str | None = Field(default=None, description="memory of one node (512GiB) for the memory plan")

    @field_validator("gpu_memory", "cpu_memory", mode="before")
    @classmethod
    def _is_a_size(cls, value: object) -> object:
        if value is not None:
            parse_size(value)  # type: ignore[arg-type]
            return str(value)
        return value
