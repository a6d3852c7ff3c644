"""Changes that make a job fit: single overrides (ZeRO-3, offloads, checkpointing, half the micro-batch, QLoRA),
then two or three together, each replanned and ranked by the peak GPU memory it leads to."""

from __future__ import annotations

import functools
import itertools

from pydantic import ValidationError

from tuneyard.launch.config import SEQUENCE_PARALLEL_STAGES, JobConfig, apply_override
from tuneyard.launch.plan.job import plan_job
from tuneyard.launch.plan.shapes import Shapes, deepspeed_switches
from tuneyard.launch.plan.types import Hardware, JobPlan, Suggestion


def candidate_changes(job: JobConfig, heads: int = 0) -> list[list[str]]:
    """The single changes worth trying, as overrides: ZeRO-3, offloads, checkpointing, half the micro-batch, QLoRA,
    and twice the sequence parallelism where the workers and the model's `heads` divide by it."""
    stage, offload_optimizer, offload_params = deepspeed_switches(job)
    raw = bool(job.deepspeed.config)  # a raw DeepSpeed JSON wins over the switches: changing them does nothing
    changes: list[list[str]] = []
    if not raw and stage < 3:
        zero3 = ["deepspeed.zero_stage=3"]
        if job.stage == "ppo":  # a role's own stage wins over the job's
            zero3 += [
                f"ppo.roles.{r}.zero_stage=3" for r in ("policy", "critic") if getattr(job.ppo.roles, r).zero_stage
            ]
        changes.append(zero3)
    if not raw and not offload_optimizer:
        changes.append((["deepspeed.zero_stage=2"] if stage == 0 else []) + ["deepspeed.offload_optimizer=true"])
    if not raw and not offload_params:
        changes.append((["deepspeed.zero_stage=3"] if stage < 3 else []) + ["deepspeed.offload_params=true"])
    if not job.training.gradient_checkpointing:
        changes.append(["training.gradient_checkpointing=true"])
    if job.stage == "ppo" and job.ppo.micro_batch_size > 1:
        changes.append([f"ppo.micro_batch_size={job.ppo.micro_batch_size // 2}"])
    elif job.stage != "ppo" and job.training.batch_size > 1:
        batch, accumulation = job.training.batch_size, job.training.grad_accum
        changes.append([f"training.batch_size={batch // 2}", f"training.grad_accum={accumulation * 2}"])
    if job.peft.method != "qlora":
        changes.append(["peft.method=qlora"])
    sharing = 2 * job.training.sequence_parallel
    if job.stage in SEQUENCE_PARALLEL_STAGES and job.cluster.workers % sharing == 0 and heads % sharing == 0:
        changes.append([f"training.sequence_parallel={sharing}"])
    return changes


def changed_job(job: JobConfig, overrides: list[str]) -> JobConfig | None:
    """The job with the overrides applied, or None when the result is not a valid job."""
    tree = job.model_dump(mode="json")
    for override in overrides:
        apply_override(tree, override)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError:
        return None


def _merged(a: list[str], b: list[str]) -> list[str]:
    """Two changes as one; where both set a key, the second's value wins (deduplicated, order kept)."""
    keys = {o.split("=", 1)[0] for o in b}
    return [o for o in a if o.split("=", 1)[0] not in keys] + b


def suggest(job: JobConfig, plan: JobPlan, shapes: Shapes, limit: int = 3) -> list[Suggestion]:
    """Up to `limit` changes that make the job fit, smallest first; else the single ones that lower the peak most.

    Single changes first, then two or three together, each size ranked by the peak GPU memory it leads to.
    """
    changes = candidate_changes(job, shapes.of(job.model).heads)
    fitting: list[Suggestion] = []
    singles: list[Suggestion] = []
    for size in (1, 2, 3):
        if len(fitting) >= limit:
            break
        combined = [functools.reduce(_merged, combo) for combo in itertools.combinations(changes, size)]
        planned = _planned(job, plan.hardware, shapes, combined)
        singles = singles or planned
        fitting += sorted((s for s in planned if s.plan.fits), key=lambda s: s.plan.peak_gpu)
    if fitting:
        return fitting[:limit]
    helping = [s for s in singles if s.plan.peak_gpu < plan.peak_gpu]
    return sorted(helping, key=lambda s: s.plan.peak_gpu)[:limit]


def _planned(job: JobConfig, hardware: Hardware, shapes: Shapes, changes: list[list[str]]) -> list[Suggestion]:
    """Each change that leaves a valid job, with that job's plan."""
    out = []
    for overrides in changes:
        changed = changed_job(job, overrides)
        if changed is None and "peft.method=qlora" in overrides:
            # QLoRA under ZeRO-3 may be refused by the job's validator: the 4-bit base then stays whole on ZeRO-2
            overrides = _merged(overrides, ["deepspeed.zero_stage=2"])
            changed = changed_job(job, overrides)
        if changed is not None:
            out.append(Suggestion(overrides, plan_job(changed, hardware, shapes)))
    return out
