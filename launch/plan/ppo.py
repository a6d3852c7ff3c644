"""The memory plan of a PPO job: each role's rank, and the roles that share a GPU under `ppo.colocate` summed."""

from __future__ import annotations

from tuneyard.cluster.resources import WORKER_BASE_BYTES
from tuneyard.launch.config import JobConfig
from tuneyard.launch.plan.memory import RankMemory, Setup, engine_memory, host_bytes, rank_memory
from tuneyard.launch.plan.shapes import (
    Shapes,
    deepspeed_switches,
    frozen_part,
    model_text,
    offload_text,
    precision_of,
    trainable_text,
)
from tuneyard.launch.plan.types import Device, Hardware, JobPlan
from tuneyard.rlhf.config import PpoSection
from tuneyard.rlhf.ppo.groups import colocated_sets, present_roles

# DeepSpeed's own defaults, which PPO's role engines get (their dict has no "auto" for a trainer to fill)
DEEPSPEED_REDUCE_BUCKET = 5e8
DEEPSPEED_PREFETCH_BUCKET = 5e7


def logit_tokens(ppo: PpoSection, micro: int) -> int | None:
    """Tokens whose logits the policy's and reference's log-prob passes hold at once: a chunk of the response
    tokens (ppo.logprob_chunk_tokens), or with 0 the whole micro-batch's (None)."""
    if not ppo.logprob_chunk_tokens:
        return None
    return min(ppo.logprob_chunk_tokens, micro * ppo.response_tokens) + micro  # + the last position's


def plan_ppo(job: JobConfig, hardware: Hardware, shapes: Shapes) -> JobPlan:
    """PPO: each role's rank, and the roles that share a GPU under ppo.colocate summed on it."""
    ppo = job.ppo
    stage, offload_optimizer, offload_params = deepspeed_switches(job)
    roles = present_roles(job.train_spec(), job.ppo, job.reward)
    seq = ppo.max_prompt_length + ppo.response_tokens
    common = Setup(
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        precision=precision_of(job),
        optim=job.training.optim,
        seq=seq,
        gradient_checkpointing=job.training.gradient_checkpointing,
        eager_attention=job.model.attn_implementation == "eager",
        reduce_bucket=DEEPSPEED_REDUCE_BUCKET,
        prefetch_bucket=DEEPSPEED_PREFETCH_BUCKET,
    )
    samples = ppo.rollout_batch_size * ppo.samples_per_prompt
    memories: dict[str, RankMemory] = {}
    for role in roles:
        section = getattr(ppo.roles, role)
        if role == "rollout":
            # vLLM takes its share of the GPU up front; on CPUs, VLLM_CPU_KVCACHE_SPACE (kv_cache_gb) for its cache
            on_gpu = bool(section.gpus_per_worker)
            memories[role] = engine_memory(
                shapes.of(job.model),
                common.precision,
                section.tensor_parallel_size,
                samples // section.workers,
                seq,
                budget=section.gpu_memory_utilization * (hardware.gpu_memory or 0) if on_gpu else 0.0,
                reserved_cache=0.0 if on_gpu else section.kv_cache_gb * 2**30,
            )
            continue
        trains = role in ("policy", "critic")
        world = section.workers
        micro = min(ppo.micro_batch_size, ppo.mini_batch_size // world) if trains else ppo.micro_batch_size
        zero = ppo.roles.zero_stage_of(role, stage)
        setup = common.changed(zero_stage=zero, world=world, micro_batch=micro, trains=trains)
        if role in ("policy", "reference"):
            setup = setup.changed(logit_tokens=logit_tokens(ppo, micro))
        if role == "policy":
            generates = ppo.generation.engine == "hf"  # else the rollout engines do
            setup = setup.changed(peft=job.peft, generation_batch=samples // world if generates else 0)
            shape = shapes.of(job.model)
        elif role == "critic":
            # auto starts from the reward model when it shares the policy's tokenizer; counted as it when present
            from_reward = job.reward.model and section.init in ("auto", "reward_model")
            source = job.reward.model if from_reward else None
            shape = shapes.of(job.model, source, "sequence-classification")
        elif role == "reference":
            shape = shapes.of(job.model)
        else:
            shape = shapes.of(job.model, job.reward.model, "sequence-classification")
        memories[role] = rank_memory(shape, setup)
    devices = []
    for together in colocated_sets(ppo.colocate, roles):
        parts = [(role, memories[role] if i == 0 else frozen_part(memories[role])) for i, role in enumerate(together)]
        per_node = hardware.gpus_per_node or max(getattr(ppo.roles, r).workers for r in together)
        host = None
        if all(getattr(ppo.roles, r).gpus_per_worker == 0 for r in together):  # on CPUs: each role's own processes
            parts = [(role, frozen_part(memory)) for role, memory in parts]  # no CUDA margin
            held = sum(getattr(ppo.roles, r).workers * (WORKER_BASE_BYTES + host_bytes(m)) for r, m in parts)
            host = held / per_node
        devices.append(Device(" + ".join(together), parts, per_node, host_per_rank=host))
    policy_shape = shapes.of(job.model)
    role_list = ", ".join(
        f"rollout {ppo.roles.rollout.workers} vLLM engine(s) x TP {ppo.roles.rollout.tensor_parallel_size}"
        if r == "rollout"
        else f"{r} {getattr(ppo.roles, r).workers} rank(s) ZeRO-{ppo.roles.zero_stage_of(r, stage)}"
        for r in memories
    )
    summary = [
        model_text(policy_shape, job.model.name_or_path)
        + f"; policy trainable {trainable_text(policy_shape, job.peft)}",
        f"roles: {role_list}; colocate: {ppo.colocate}; "
        f"offload: {offload_text(offload_optimizer, offload_params)}; {common.precision}",
        f"micro-batch {ppo.micro_batch_size} x {seq} tokens (prompt + new tokens); "
        f"{'policy' if ppo.generation.engine == 'hf' else 'vLLM'} generates {samples} sample(s) over its "
        "ranks; gradient checkpointing " + ("on" if common.gradient_checkpointing else "off"),
        "log-probs from "
        + (
            f"the logits of {ppo.logprob_chunk_tokens} response tokens at a time (ppo.logprob_chunk_tokens)"
            if ppo.logprob_chunk_tokens
            else "whole logits (ppo.logprob_chunk_tokens: 0)"
        ),
    ]
    return JobPlan(devices, hardware, summary)
