"""The plan of any job: PPO's (a controller driving role groups) or an SPMD stage's."""

from __future__ import annotations

from tuneyard.launch.config import JobConfig
from tuneyard.launch.plan.ppo import plan_ppo
from tuneyard.launch.plan.shapes import Shapes
from tuneyard.launch.plan.spmd import plan_spmd
from tuneyard.launch.plan.types import Hardware, JobPlan
from tuneyard.training.stages import stage_spec


def plan_job(job: JobConfig, hardware: Hardware, shapes: Shapes | None = None) -> JobPlan:
    """The per-device memory of `job` on `hardware` (`shapes`: a cache shared over many plans)."""
    shapes = shapes or Shapes()
    if stage_spec(job.stage).controller:
        return plan_ppo(job, hardware, shapes)
    return plan_spmd(job, hardware, shapes)
