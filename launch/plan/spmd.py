"""`tuneyard plan`: the memory each GPU (and each node's CPU) needs for a job, the verdict, and changes that fit.

`train` and `submit` run the same check before anything starts when the job uses GPUs (`--no-plan-check`
skips it). The arithmetic lives in launch/plan/memory.py; this module maps a job onto it: which models
share a device (DPO's reference, PPO's colocated roles), the batch and length each sees, and the changes
worth trying when a job does not fit.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import ValidationError
from tuneyard.cluster.config import parse_size
from tuneyard.launch.config import JobConfig, apply_override
from tuneyard.launch.plan.memory import (
    ModelShape,
    RankMemory,
    Setup,
    gib,
    model_config_of,
    rank_memory,
    shape_of_config,
)
from tuneyard.training.config import ADAPTER_METHODS, ModelConfig, PeftSection
from tuneyard.training.errors import UserError

log = logging.getLogger(__name__)


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

    @property
    def gpu(self) -> float:
        """Bytes on this GPU."""
        return sum(memory.gpu for _, memory in self.parts)

    @property
    def cpu(self) -> float:
        """Bytes of CPU memory a node needs for its GPUs like this one (offloaded states, or loading)."""
        return sum(memory.cpu for _, memory in self.parts) * self.per_node


@dataclass
class JobPlan:
    """The devices of a job with their figures, the memory they have, and what the job is."""

    devices: list[Device]
    hardware: Hardware
    summary: list[str] = field(default_factory=list)

    @property
    def peak_gpu(self) -> float:
        """The fullest GPU's bytes."""
        return max(d.gpu for d in self.devices)

    @property
    def peak_cpu(self) -> float:
        """The fullest node's CPU bytes."""
        return max(d.cpu for d in self.devices)

    @property
    def gpu_fits(self) -> bool:
        """Every GPU holds its figures (True when the GPU memory is unknown)."""
        return self.hardware.gpu_memory is None or self.peak_gpu <= self.hardware.gpu_memory

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


# ------------------------------------------------------------------------------------------------ job -> devices


def deepspeed_switches(job: JobConfig) -> tuple[int, bool, bool]:
    """(ZeRO stage, offload optimizer, offload params): the raw deepspeed.config JSON's when set (it wins)."""
    section = job.deepspeed
    if not section.config:
        return section.zero_stage, section.offload_optimizer, section.offload_params
    zero = json.loads(Path(section.config).read_text()).get("zero_optimization", {})
    on_cpu = ("cpu", "nvme")
    return (
        int(zero.get("stage", 0)),
        (zero.get("offload_optimizer") or {}).get("device") in on_cpu,
        (zero.get("offload_param") or {}).get("device") in on_cpu,
    )


class Shapes:
    """Model shapes by source and head, each built once on the meta device (suggestions replan many times)."""

    def __init__(self, architecture: str | None = None):
        self.architecture = architecture
        self.cache: dict[tuple, ModelShape] = {}

    def of(self, model: ModelConfig, source: str | None = None, task: str = "causal-lm") -> ModelShape:
        """The shape of the job's model (or another folder, `source`), as a causal LM or a one-output classifier."""
        key = (source, task, json.dumps(model.architecture, sort_keys=True, default=str), model.name_or_path)
        if key not in self.cache:
            own = source is None
            config = model_config_of(model, self.architecture if own else None, source)
            self.cache[key] = shape_of_config(copy.deepcopy(config), task)
        return self.cache[key]


def precision_of(job: JobConfig) -> str:
    """The precision the plan assumes for the job."""
    # "auto" means bf16 on a GPU that has it: the plan is for GPUs (training/model.py resolve_dtype)
    return "bf16" if job.training.precision == "auto" else job.training.precision


def _layout(job: JobConfig, hardware: Hardware) -> tuple[int, int, int]:
    """(ranks, GPUs per node, ranks per GPU) of an SPMD job: --nodes x --gpus-per-node ranks, else cluster.workers."""
    gpus = job.cluster.gpus_per_worker
    per_gpu = max(1, round(1 / gpus)) if 0 < gpus < 1 else 1  # fractional GPUs: ranks share one
    if hardware.nodes and hardware.gpus_per_node:
        return hardware.nodes * hardware.gpus_per_node, hardware.gpus_per_node, per_gpu
    world = job.cluster.workers
    per_node = hardware.gpus_per_node or math.ceil(world / per_gpu / (hardware.nodes or 1))
    return world, max(1, per_node), per_gpu


def frozen_part(memory: RankMemory) -> RankMemory:
    """A model that shares a GPU with the trained one: without a second margin."""
    return replace(memory, margin=0.0)  # one margin per GPU, carried by its first part


def plan_job(job: JobConfig, hardware: Hardware, shapes: Shapes | None = None) -> JobPlan:
    """The per-device memory of `job` on `hardware`."""
    shapes = shapes or Shapes()
    if job.stage == "ppo":
        from tuneyard.launch.plan.ppo import plan_ppo

        return plan_ppo(job, hardware, shapes)
    stage, offload_optimizer, offload_params = deepspeed_switches(job)
    world, per_node, per_gpu = _layout(job, hardware)
    classifier = job.stage == "reward"
    shape = shapes.of(job.model, task="sequence-classification" if classifier else "causal-lm")
    pairs = 2 if job.stage in ("reward", "dpo") else 1  # chosen and rejected run in one batch
    completion = {
        "grpo": job.grpo.max_completion_length,
        "rloo": job.rloo.max_completion_length,
        "distill": job.distill.max_completion_length,
    }
    seq = job.data.max_length + completion.get(job.stage, 0)  # the sampling stages append their completions
    if job.peft.method == "prompt_tuning":
        seq += job.peft.num_virtual_tokens  # its virtual tokens go through every layer with the row
    setup = Setup(
        zero_stage=stage,
        world=world,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        precision=precision_of(job),
        peft=job.peft,
        optim=job.training.optim,
        micro_batch=job.training.batch_size * pairs,
        seq=seq,
        gradient_checkpointing=job.training.gradient_checkpointing,
        eager_attention=job.model.attn_implementation == "eager",
        generation_batch=job.training.batch_size if job.stage in completion else 0,
    )
    parts = [("rank", rank_memory(shape, setup))]
    adapter = job.peft.method in ADAPTER_METHODS  # the reference is the base with the adapter off: no copy
    reference = (
        (job.stage == "dpo" and not job.dpo.precompute_ref_log_probs)
        or (job.stage == "kto" and not job.kto.precompute_ref_log_probs)
        or (job.stage == "grpo" and job.grpo.beta > 0)
        or (job.stage == "rloo" and job.rloo.beta > 0)
    )
    if reference and not adapter:
        frozen = setup.changed(trains=False, peft=PeftSection())
        parts.append(("reference", frozen_part(rank_memory(shape, frozen))))
    if job.stage == "distill" and job.distill.teacher:  # frozen beside the student, sharded like a reference
        teacher = job.model.model_copy(
            update={"init": "pretrained", "name_or_path": job.distill.teacher, "architecture": None}
        )
        teacher_shape = shapes.of(teacher, job.distill.teacher)  # the teacher's own config, not the student's
        frozen = setup.changed(trains=False, peft=PeftSection(), generation_batch=0)
        parts.append(("teacher", frozen_part(rank_memory(teacher_shape, frozen))))
    if job.stage in ("grpo", "rloo") and job.reward.model:
        reward_shape = shapes.of(job.model, job.reward.model, "sequence-classification")
        frozen = setup.changed(trains=False, peft=PeftSection(), generation_batch=0)
        parts.append(("reward", frozen_part(rank_memory(reward_shape, frozen))))
    parts = [(name, _scaled(memory, per_gpu)) for name, memory in parts]
    device = Device("each GPU" if per_gpu == 1 else f"each GPU ({per_gpu} ranks)", parts, per_node)
    trainable = trainable_text(shape, job.peft)
    summary = [
        model_text(shape, job.model.name_or_path) + f"; trainable {trainable}",
        f"{world} rank(s), {per_node} GPU(s) per node; ZeRO-{stage}, "
        f"offload: {offload_text(offload_optimizer, offload_params)}; {setup.precision}; optimizer {setup.optim}",
        f"micro-batch {setup.micro_batch} x {seq} tokens"
        + (" (chosen + rejected)" if pairs == 2 else "")
        + f"; gradient checkpointing {'on' if setup.gradient_checkpointing else 'off'}",
    ]
    return JobPlan([device], hardware, summary)


def _scaled(memory: RankMemory, ranks: int) -> RankMemory:
    """`ranks` ranks on one GPU (fractional cluster.gpus_per_worker) hold `ranks` times one's figures."""
    if ranks == 1:
        return memory
    names = ("weights", "gradients", "optimizer", "activations_full", "activations_checkpointed", "gathered")
    more = {n: getattr(memory, n) * ranks for n in names + ("buckets", "cpu_weights", "cpu_gradients")}
    more |= {"cpu_optimizer": memory.cpu_optimizer * ranks, "cpu_load": memory.cpu_load * ranks}
    return replace(memory, **more)


def offload_text(optimizer: bool, params: bool) -> str:
    """What is offloaded, in words."""
    return ", ".join(n for n, on in (("optimizer", optimizer), ("params", params)) if on) or "none"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def model_text(shape: ModelShape, name: str | None) -> str:
    """The model's line of the plan: name, parameters, layers, width, head."""
    head = f"vocab {shape.vocab}" if shape.vocab > 1 else "a one-output head"
    sizes = f"{shape.layers} layers, hidden {shape.hidden}, {head}"
    return f"model: {name or 'scratch'}, {_count(shape.total)} parameters ({sizes})"


def trainable_text(shape: ModelShape, peft: PeftSection) -> str:
    """The trainable parameters and the method, in words."""
    from tuneyard.launch.plan.memory import trainable_parameters

    tokens = f"{peft.num_virtual_tokens} virtual tokens"
    method = {
        "qlora": f"qlora r={peft.r}, 4-bit {peft.quant_type} base",
        "lora": f"lora r={peft.r}",
        "prompt_tuning": f"prompt_tuning, {tokens}",
        "prefix_tuning": f"prefix_tuning, {tokens}{', projected' if peft.prefix_projection else ''}",
    }
    return f"{_count(trainable_parameters(shape, peft))} ({method.get(peft.method, peft.method)})"


# ------------------------------------------------------------------------------------------------ suggestions


def candidate_changes(job: JobConfig) -> list[list[str]]:
    """The single changes worth trying, as overrides: ZeRO-3, offloads, checkpointing, half the micro-batch, QLoRA."""
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
    """Up to `limit` changes that make the job fit: single changes first, then two or three together, each size
    ranked by the peak GPU memory it leads to; when none fits, the single changes that lower the peak most."""
    changes = candidate_changes(job)
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


# ------------------------------------------------------------------------------------------------ output


ROWS = (
    ("weights", lambda m: m.weights),
    ("gradients", lambda m: m.gradients),
    ("optimizer state", lambda m: m.optimizer),
    ("activations, checkpointed", lambda m: m.activations_checkpointed),
    ("activations, not checkpointed", lambda m: m.activations_full),
    ("buffers", lambda m: m.buffers),
)


def format_device(device: Device, hardware: Hardware) -> list[str]:
    """One device's table in GiB: a column per rank sharing it and the total; the activation row that counts is *."""
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
    totals = [m.gpu for _, m in device.parts] + ([device.gpu] if len(device.parts) > 1 else [])
    of = f"   of {gib(hardware.gpu_memory)}" if hardware.gpu_memory else ""
    lines.append("  GPU total".ljust(34) + "".join(gib(t).rjust(11) for t in totals) + of)
    cpu = [m.cpu * device.per_node for _, m in device.parts] + ([device.cpu] if len(device.parts) > 1 else [])
    of = f"   of {gib(hardware.cpu_memory)}" if hardware.cpu_memory else ""
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


def hardware_from_args(args, job: JobConfig) -> Hardware:
    """`tuneyard plan`'s --nodes, --gpus-per-node, --gpu-memory and --cpu-memory, else the job's cluster.*_memory."""

    def size(text: str | None, flag: str) -> int | None:
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
