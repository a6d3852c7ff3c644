"""The `cluster` job section: where the workers run and what each one gets."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ClusterConfig(BaseModel):
    """A Ray address (or none: a local Ray on 127.0.0.1) and the per-worker resources."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(default=None, description="ray://host:port or host:port; none starts a local Ray")
    workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
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
