"""The memory plan of an SPMD stage (sft, dpo, grpo, distill, ...): one rank per GPU, or a few sharing one.

Beside the trained model a GPU may hold frozen ones: DPO's reference (not with an adapter: the base with the
adapter off is the reference), distill's teacher, and the reward model TRL's online trainers score with.
"""

from __future__ import annotations

from tuneyard.cluster.resources import WORKER_BASE_BYTES
from tuneyard.launch.config import JobConfig
from tuneyard.launch.plan.memory import Setup, host_bytes, rank_memory
from tuneyard.launch.plan.shapes import (
    Shapes,
    deepspeed_switches,
    frozen_part,
    model_text,
    offload_text,
    precision_of,
    rank_layout,
    scaled,
    trainable_text,
)
from tuneyard.launch.plan.types import Device, Hardware, JobPlan
from tuneyard.training.config import ADAPTER_METHODS, PeftSection
from tuneyard.training.stages import stage_spec
from tuneyard.training.tiled_mlp import tiled_mlp_wanted

# TRL's SFTTrainer (stages pretrain and sft) computes its loss through a fused output head that projects 4096
# tokens at a time (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE): no [tokens x vocab] logits for the whole batch
SFT_TRAINER = ("pretrain", "sft")
FUSED_HEAD_TOKENS = 4096


def plan_spmd(job: JobConfig, hardware: Hardware, shapes: Shapes) -> JobPlan:
    """The per-GPU memory of an SPMD stage's job: the trained rank and the frozen models beside it."""
    stage, offload_optimizer, offload_params = deepspeed_switches(job)
    world, per_node, per_gpu = rank_layout(job, hardware)
    spec = stage_spec(job.stage)
    shape = shapes.of(job.model, task=spec.task)
    pairs = spec.sequences_per_row  # chosen and rejected run in one batch
    completion = spec.completion_length(job) if spec.completion_length else 0
    seq = job.data.max_length + completion  # the sampling stages append their completions
    if job.peft.method == "prompt_tuning":
        seq += job.peft.num_virtual_tokens  # its virtual tokens go through every layer with the row
    sharing = job.training.sequence_parallel
    rank_seq = -(-seq // sharing)  # Ulysses: each rank of a group holds its share of every sequence's tokens
    setup = Setup(
        zero_stage=stage,
        world=world,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        precision=precision_of(job),
        peft=job.peft,
        optim=job.training.optim,
        micro_batch=job.training.batch_size * pairs,
        seq=rank_seq,
        gradient_checkpointing=job.training.gradient_checkpointing,
        eager_attention=job.model.attn_implementation == "eager",
        generation_batch=job.training.batch_size if completion else 0,
        logit_tokens=min(job.training.batch_size * rank_seq, FUSED_HEAD_TOKENS) if job.stage in SFT_TRAINER else None,
        tiled_mlp=spec.task == "causal-lm" and tiled_mlp_wanted(job),
    )
    parts = [("rank", rank_memory(shape, setup))]
    adapter = job.peft.method in ADAPTER_METHODS  # the reference is the base with the adapter off: no copy
    if spec.has_reference(job) and not adapter:
        frozen = setup.changed(trains=False, peft=PeftSection())
        parts.append(("reference", frozen_part(rank_memory(shape, frozen))))
    if job.stage == "distill" and job.distill.teacher:  # frozen beside the student, sharded like a reference
        teacher_shape = shapes.of(
            job.model.loading(job.distill.teacher), job.distill.teacher
        )  # the teacher's own config, not the student's
        frozen = setup.changed(trains=False, peft=PeftSection(), generation_batch=0)
        parts.append(("teacher", frozen_part(rank_memory(teacher_shape, frozen))))
    if "reward" in spec.sections and job.reward.model:  # TRL's online trainers score with it beside the policy
        reward_shape = shapes.of(job.model, job.reward.model, "sequence-classification")
        frozen = setup.changed(trains=False, peft=PeftSection(), generation_batch=0)
        parts.append(("reward", frozen_part(rank_memory(reward_shape, frozen))))
    parts = [(name, scaled(memory, per_gpu)) for name, memory in parts]
    if job.cluster.gpus_per_worker == 0:  # on CPUs: one worker process per rank holds all of it in CPU memory
        parts = [(name, frozen_part(memory)) for name, memory in parts]  # no CUDA margin
        host = WORKER_BASE_BYTES + sum(host_bytes(memory) for _, memory in parts)
        device = Device("each worker (CPU)", parts, per_node, host_per_rank=host)
    else:
        device = Device("each GPU" if per_gpu == 1 else f"each GPU ({per_gpu} ranks)", parts, per_node)
    trainable = trainable_text(shape, job.peft)
    summary = [
        model_text(shape, job.model.name_or_path) + f"; trainable {trainable}",
        f"{world} rank(s), {per_node} {'worker(s)' if device.host_per_rank else 'GPU(s)'} per node; ZeRO-{stage}, "
        f"offload: {offload_text(offload_optimizer, offload_params)}; {setup.precision}; optimizer {setup.optim}",
        f"micro-batch {setup.micro_batch} x {seq} tokens"
        + (" (chosen + rejected)" if pairs == 2 else "")
        + (f", each sequence shared by {sharing} ranks ({rank_seq} tokens each)" if sharing > 1 else "")
        + f"; gradient checkpointing {'on' if setup.gradient_checkpointing else 'off'}",
    ]
    return JobPlan([device], hardware, summary)
