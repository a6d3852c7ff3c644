"""`tuneyard plan` and the check before `train` and `submit`: the tables, the verdict, the suggested changes.

`train` and `submit` run the same check before anything starts when the job uses GPUs (`--no-plan-check`
skips it); a job that does not fit is refused with its top change.
"""

from __future__ import annotations

import argparse
import logging
import os

from tuneyard.cluster.config import parse_size
from tuneyard.cluster.resources import WORKER_BASE_BYTES
from tuneyard.launch.config import JobConfig
from tuneyard.launch.plan.job import plan_job
from tuneyard.launch.plan.memory import gib, host_bytes
from tuneyard.launch.plan.shapes import Shapes
from tuneyard.launch.plan.suggestions import suggest
from tuneyard.launch.plan.types import Device, Hardware, JobPlan, Suggestion
from tuneyard.training.errors import UserError

log = logging.getLogger(__name__)

ROWS = (
    ("weights", lambda m: m.weights),
    ("gradients", lambda m: m.gradients),
    ("optimizer state", lambda m: m.optimizer),
    ("activations, checkpointed", lambda m: m.activations_checkpointed),
    ("activations, not checkpointed", lambda m: m.activations_full),
    ("buffers", lambda m: m.buffers),
)


def format_device(device: Device, hardware: Hardware) -> list[str]:
    """One device's table in GiB: a column per rank sharing it and the total; the activation row that counts is *.

    A CPU job's device is its worker: the rows are CPU memory, and the node's figure adds each worker's base.
    """
    names = [name for name, _ in device.parts]
    columns = names + ["total"] if len(names) > 1 else names
    lines = [f"{device.name} (GiB)".ljust(34) + "".join(c.rjust(11) for c in columns)]
    checkpointing = device.parts[0][1].checkpointing
    for label, value in ROWS:
        counts = label.endswith("not checkpointed") != checkpointing or not label.startswith("activations")
        cells = [value(m) for _, m in device.parts]
        if len(cells) > 1:
            cells.append(sum(cells))
        mark = "*" if label.startswith("activations") and counts else " "
        lines.append(f"  {label}{mark}".ljust(34) + "".join(gib(c).rjust(11) for c in cells))
    on_cpu = device.host_per_rank is not None
    totals = [host_bytes(m) if on_cpu else m.gpu for _, m in device.parts]
    totals += [sum(totals)] if len(device.parts) > 1 else []
    of = f"   of {gib(hardware.gpu_memory)}" if hardware.gpu_memory and not on_cpu else ""
    label = "  total, without the worker's base" if on_cpu else "  GPU total"
    lines.append(label.ljust(34) + "".join(gib(t).rjust(11) for t in totals) + of)
    of = f"   of {gib(hardware.cpu_memory)}" if hardware.cpu_memory else ""
    if on_cpu:
        lines.append("  a worker's base".ljust(34) + gib(WORKER_BASE_BYTES).rjust(11))
        lines.append(f"  CPU per node ({device.per_node} workers)".ljust(34) + gib(device.cpu).rjust(11) + of)
        return lines
    cpu = [m.cpu * device.per_node for _, m in device.parts] + ([device.cpu] if len(device.parts) > 1 else [])
    lines.append(f"  CPU per node ({device.per_node} GPUs)".ljust(34) + "".join(gib(c).rjust(11) for c in cpu) + of)
    return lines


def largest_figures(device: Device, count: int = 3) -> str:
    """The device's biggest figures, e.g. `optimizer state 460.12, gradients 153.37, weights 76.69 GiB`."""
    checkpointing = device.parts[0][1].checkpointing
    sums = {}
    for label, value in ROWS:
        if label.startswith("activations"):
            if label.endswith("not checkpointed") == checkpointing:
                continue  # the setting the job does not use
            label = "activations"
        sums[label] = sum(value(m) for _, m in device.parts)
    top = sorted(sums.items(), key=lambda item: -item[1])[:count]
    return ", ".join(f"{label} {gib(value)}" for label, value in top) + " GiB"


def verdict(plan: JobPlan) -> str:
    """One line: fits (with the headroom), does not fit (which device, by how much), or not checked."""
    hardware = plan.hardware
    worst = max(plan.devices, key=lambda d: d.gpu)
    if plan.on_cpu:
        if hardware.cpu_memory is None:
            return f"a CPU job; CPU memory per node not given: {gib(plan.peak_cpu)} GiB not checked"
        fits = "fits" if plan.cpu_fits else "does NOT fit"
        return f"a CPU job, {fits}: {gib(plan.peak_cpu)} GiB of {gib(hardware.cpu_memory)} GiB of CPU memory per node"
    if hardware.gpu_memory is None:
        text = f"GPU memory not given (--gpu-memory or cluster.gpu_memory): not checked; peak {gib(plan.peak_gpu)} GiB"
    elif plan.gpu_fits:
        text = f"fits: peak {gib(plan.peak_gpu)} GiB of {gib(hardware.gpu_memory)} GiB per GPU"
    else:
        text = (
            f"does NOT fit: {worst.name} needs {gib(worst.gpu)} GiB of {gib(hardware.gpu_memory)} GiB "
            f"({largest_figures(worst)})"
        )
    if hardware.cpu_memory is None:
        if plan.peak_cpu > 0:
            text += f"; CPU memory per node not given: {gib(plan.peak_cpu)} GiB not checked"
    elif plan.cpu_fits:
        text += f"; CPU {gib(plan.peak_cpu)} GiB of {gib(hardware.cpu_memory)} GiB per node"
    else:
        text += f"; CPU does NOT fit: {gib(plan.peak_cpu)} GiB of {gib(hardware.cpu_memory)} GiB per node"
    return text


def format_plan(plan: JobPlan, suggestions: list[Suggestion]) -> str:
    """The plan as printed by `tuneyard plan`: the summary, a table per device, the verdict, the suggestions."""
    lines = list(plan.summary) + [""]
    for device in plan.devices:
        lines += format_device(device, plan.hardware) + [""]
    lines.append(f"verdict: {verdict(plan)}")
    if not plan.fits and suggestions:
        fit = suggestions[0].plan.fits
        lines.append("changes that fit:" if fit else "no change fits alone; these lower the peak most:")
        for i, s in enumerate(suggestions, 1):
            cpu = f", CPU {gib(s.plan.peak_cpu)} GiB/node" if s.plan.peak_cpu else ""
            lines.append(f"  {i}. {s.text}  -> peak {gib(s.plan.peak_gpu)} GiB/GPU{cpu}")
    elif not plan.fits:
        lines.append("no change of ZeRO stage, offload, checkpointing, micro-batch or QLoRA makes it fit")
    lines.append(
        "* the activations that count (training.gradient_checkpointing). Estimates: model states as DeepSpeed's "
        "estimators, activations per Korthikanti et al. 2022, plus a 1 GiB margin per GPU."
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ entry points


def run_plan(job: JobConfig, hardware: Hardware, architecture: str | None = None) -> tuple[JobPlan, list[Suggestion]]:
    """The plan of `job` on `hardware` and, when it does not fit, the changes that would make it fit."""
    shapes = Shapes(architecture)
    plan = plan_job(job, hardware, shapes)
    return plan, ([] if plan.fits else suggest(job, plan, shapes))


def uses_gpus(job: JobConfig, gpus_per_node: int = 0) -> bool:
    """Whether the job's workers (or PPO roles), or a SLURM allocation, ask for GPUs."""
    roles = job.ppo.roles
    if job.stage == "ppo":
        return any(getattr(roles, r).gpus_per_worker > 0 for r in ("policy", "critic", "reference", "reward"))
    return job.cluster.gpus_per_worker > 0 or gpus_per_node > 0


def _this_machine_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_job_memory(job: JobConfig, nodes: int | None = None, gpus_per_node: int = 0) -> None:
    """Refuse a GPU job whose plan does not fit, before anything starts (train, submit).

    The GPU's memory is cluster.gpu_memory, else the visible GPU's; with neither, one log line and no check.
    The node's CPU memory is cluster.cpu_memory, else this machine's for a local Ray (no cluster.address).
    """
    if not uses_gpus(job, gpus_per_node):
        return
    if job.cluster.gpu_memory:
        gpu_memory = parse_size(job.cluster.gpu_memory)
    else:
        import torch

        if not torch.cuda.is_available():
            log.warning("memory plan skipped: no cluster.gpu_memory in the job and no GPU visible here")
            return
        gpu_memory = torch.cuda.get_device_properties(0).total_memory
    if job.cluster.cpu_memory:
        cpu_memory: int | None = parse_size(job.cluster.cpu_memory)
    else:
        cpu_memory = _this_machine_memory() if job.cluster.address is None and nodes is None else None
    hardware = Hardware(nodes=nodes, gpu_memory=gpu_memory, cpu_memory=cpu_memory)  # ranks: cluster.workers
    try:
        plan, suggestions = run_plan(job, hardware)
    except UserError as exc:  # a hub model not on disk: the plan cannot count it, the run will download it
        log.warning("memory plan skipped: %s", str(exc).split(";")[0])
        return
    if plan.fits:
        return
    worst = max(plan.devices, key=lambda d: d.gpu)
    where = (
        f"each GPU would need {gib(worst.gpu)} GiB of {gib(gpu_memory)} GiB ({largest_figures(worst)})"
        if not plan.gpu_fits
        else f"each node would need {gib(plan.peak_cpu)} GiB of CPU memory of {gib(cpu_memory or 0)} GiB (offload)"
    )
    if suggestions:
        best = suggestions[0]
        fix = f"{'the top change that fits' if best.plan.fits else 'the change that helps most'}: {best.text} " + (
            f"(peak {gib(best.plan.peak_gpu)} GiB per GPU)"
        )
    else:
        fix = "no single change of ZeRO stage, offload, checkpointing, micro-batch or QLoRA makes it fit"
    raise UserError(
        f"the memory plan says this job does not fit: {where}; {fix}. `tuneyard plan JOB.yaml` prints the whole "
        "table and more changes; --no-plan-check skips this check"
    )


def hardware_from_args(args: argparse.Namespace, job: JobConfig) -> Hardware:
    """`tuneyard plan`'s --nodes, --gpus-per-node, --gpu-memory and --cpu-memory, else the job's cluster.*_memory."""

    def size(text: str | None, flag: str) -> int | None:
        """The bytes of a size like `80GiB`, or None; a malformed one is a UserError naming `flag`."""
        if text is None:
            return None
        try:
            return parse_size(text)
        except ValueError as exc:
            raise UserError(f"{flag}: {exc}") from None

    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1")
    return Hardware(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_memory=size(args.gpu_memory, "--gpu-memory") or size(job.cluster.gpu_memory, "cluster.gpu_memory"),
        cpu_memory=size(args.cpu_memory, "--cpu-memory") or size(job.cluster.cpu_memory, "cluster.cpu_memory"),
    )


def print_plan(job: JobConfig, hardware: Hardware, architecture: str | None = None) -> int:
    """`tuneyard plan`: print the tables, verdict and suggestions; exit code 0 when the job fits, 1 when not."""
    plan, suggestions = run_plan(job, hardware, architecture)
    print(format_plan(plan, suggestions))
    return 0 if plan.fits else 1
