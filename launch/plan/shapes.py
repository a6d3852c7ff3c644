"""From a job to what the arithmetic needs: model shapes, DeepSpeed switches, precision, ranks on GPUs.

Also the words of a plan's summary lines (model, trainable parameters, offload), which the SPMD and PPO plans
both write.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

from tuneyard.launch.config import JobConfig
from tuneyard.launch.plan.memory import (
    ModelShape,
    RankMemory,
    model_config_of,
    shape_of_config,
    trainable_parameters,
)
from tuneyard.launch.plan.types import Hardware
from tuneyard.training.config import ModelConfig, PeftSection


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

    def __init__(self, architecture: str | None = None) -> None:
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


def rank_layout(job: JobConfig, hardware: Hardware) -> tuple[int, int, int]:
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


def scaled(memory: RankMemory, ranks: int) -> RankMemory:
    """`ranks` ranks on one GPU (fractional cluster.gpus_per_worker) hold `ranks` times one's figures."""
    if ranks == 1:
        return memory
    names = ("weights", "gradients", "optimizer", "activations_full", "activations_checkpointed", "gathered")
    more = {n: getattr(memory, n) * ranks for n in names + ("buckets", "cpu_weights", "cpu_gradients")}
    more |= {"cpu_optimizer": memory.cpu_optimizer * ranks, "cpu_load": memory.cpu_load * ranks}
    return replace(memory, **more)


# ------------------------------------------------------------------------------------------------ summary words


def offload_text(optimizer: bool, params: bool) -> str:
    """What is offloaded, in words."""
    return ", ".join(n for n, on in (("optimizer", optimizer), ("params", params)) if on) or "none"


def _count(n: float) -> str:
    """A parameter count in billions or millions, e.g. `6.74B`."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def model_text(shape: ModelShape, name: str | None) -> str:
    """The model's line of the plan: name, parameters, layers, width, head."""
    head = f"vocab {shape.vocab}" if shape.vocab > 1 else "a one-output head"
    sizes = f"{shape.layers} layers, hidden {shape.hidden}, {head}"
    return f"model: {name or 'scratch'}, {_count(shape.total)} parameters ({sizes})"


def trainable_text(shape: ModelShape, peft: PeftSection) -> str:
    """The trainable parameters and the method, in words."""
    tokens = f"{peft.num_virtual_tokens} virtual tokens"
    method = {
        "qlora": f"qlora r={peft.r}, 4-bit {peft.quant_type} base",
        "lora": f"lora r={peft.r}",
        "prompt_tuning": f"prompt_tuning, {tokens}",
        "prefix_tuning": f"prefix_tuning, {tokens}{', projected' if peft.prefix_projection else ''}",
    }
    return f"{_count(trainable_parameters(shape, peft))} ({method.get(peft.method, peft.method)})"
