"""The preference stages as recipes for one SPMD worker: reward model, DPO, KTO, GRPO, RLOO and distillation
through TRL.

Each reads top to bottom like `causal_lm_recipe.run_training`: data, model (and reference, reward or teacher
models), the TRL config built on the shared trainer arguments, the trainer, then the shared
train-and-publish step. `ray_worker` is the Ray entry point.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import torch.distributed as dist
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase, PrinterCallback, set_seed

from tuneyard.rlhf.config import StageSections
from tuneyard.rlhf.losses import trl_loss_terms
from tuneyard.rlhf.rewards import lookup
from tuneyard.rlhf.trl_rows import rlhf_datasets
from tuneyard.training.callbacks import PreemptionCallback
from tuneyard.training.config import ModelConfig, TrainSpec
from tuneyard.training.errors import UserError
from tuneyard.training.finetune_method import (
    apply_finetune_method,
    keep_adapters_in_fp32,
    lora_config,
    memory_footprint,
)
from tuneyard.training.model import check_model_source, load_model, load_tokenizer
from tuneyard.training.nonfinite import NonFiniteGuard
from tuneyard.training.run_dir import set_status
from tuneyard.training.stages import stage_spec
from tuneyard.training.trainer_setup import (
    DEEPSPEED_STATUS,
    common_trainer_kwargs,
    guarded,
    load_trained_model,
    materialize_scratch_base,
    run_callbacks,
    train_and_publish,
)
from tuneyard.training.worker_start import start_ray_worker

log = logging.getLogger(__name__)
# the stages that train against a frozen reference: the starting policy, or the base with the adapter disabled
REFERENCE_STAGES = ("dpo", "kto")


def check_reward_model(path: str, allow_pickle: bool | None = None) -> None:
    """Refuse a reward-model folder that is not a sequence-classification model with one output.

    `allow_pickle` (the job's model.allow_pickle) False refuses pickle-only weights; None leaves them to the loader.
    """
    check_model_source(path, "reward.model", allow_pickle=allow_pickle)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:  # a hub id that is not cached, an unknown model_type
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"reward.model: cannot read the config of '{path}' ({first}); give the final/ folder of a "
            "`stage: reward` run"
        ) from None
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        raise UserError(
            f"reward.model: '{path}' is not a reward model (architectures {architectures}, "
            f"num_labels {config.num_labels}); give the final/ folder of a `stage: reward` run"
        )


def reward_functions(stage: str, pref: StageSections, allow_pickle: bool | None = None) -> list:
    """GRPO's or RLOO's rewards: the named functions, then the reward-model folder (TRL loads it)."""
    if not pref.reward.functions and not pref.reward.model:
        raise UserError(f"stage {stage} needs rewards: set reward.functions (named functions) and/or reward.model")
    functions: list = [lookup(f.name) for f in pref.reward.functions]
    if pref.reward.model:
        check_reward_model(pref.reward.model, allow_pickle=allow_pickle)
        functions.append(pref.reward.model)  # TRL loads it as a sequence-classification model
    return functions


def check_teacher(teacher: str, tokenizer: PreTrainedTokenizerBase, allow_pickle: bool | None = None) -> None:
    """Refuse a teacher that is not a model folder (or hub id), or whose vocabulary differs from the student's."""
    from transformers import AutoTokenizer

    check_model_source(teacher, "distill.teacher", allow_pickle=allow_pickle)
    try:
        teacher_vocab = AutoTokenizer.from_pretrained(teacher).get_vocab()
    except (OSError, ValueError, TypeError) as exc:  # no tokenizer files: compare the vocabulary sizes below
        log.info("distill.teacher: no tokenizer in '%s' (%s); comparing vocabulary sizes only", teacher, exc)
        return
    student_vocab = tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()))
        example = ", ".join(repr(token) for token, _ in differing[:3])
        raise UserError(
            f"distill.teacher: the tokenizer of '{teacher}' differs from the student's ({len(teacher_vocab)} vs "
            f"{len(student_vocab)} tokens, {len(differing)} token-id pairs differ, e.g. {example}). Distillation "
            "(TRL's DistillationTrainer) matches the teacher's next-token distribution id by id, so both models must "
            "share one vocabulary: give a student with the teacher's tokenizer (model.tokenizer: the teacher's "
            "folder for a scratch student), or a teacher from the student's family; cross-tokenizer distillation "
            "is not supported"
        )


def _check_vocab_sizes(student: PreTrainedModel, teacher: PreTrainedModel, where: str) -> None:
    """The two output layers must score the same token ids (TRL checks this too, with a bare ValueError)."""
    sizes = (student.config.get_text_config().vocab_size, teacher.config.get_text_config().vocab_size)
    if sizes[0] != sizes[1]:
        raise UserError(
            f"distill.teacher: '{where}' scores {sizes[1]} token ids and the student {sizes[0]}; distillation "
            "compares the two next-token distributions id by id, so give a teacher and student of one vocabulary"
        )


def _stage_config(spec: TrainSpec, pref: StageSections, run_dir: Path, has_eval: bool):
    """The TRL config of the stage on top of the arguments every stage shares."""
    common = common_trainer_kwargs(spec, run_dir, has_eval)
    if spec.stage == "reward":
        from trl import RewardConfig

        return RewardConfig(**common, max_length=spec.data.max_length)
    if spec.stage == "dpo":
        from trl import DPOConfig

        loss_types, weights = trl_loss_terms(pref.dpo.loss_type, pref.dpo.label_smoothing, pref.dpo.sft_weight)
        return DPOConfig(
            **common,
            beta=pref.dpo.beta,
            loss_type=loss_types,
            loss_weights=weights,
            label_smoothing=pref.dpo.label_smoothing,
            precompute_ref_log_probs=pref.dpo.precompute_ref_log_probs,
            max_length=spec.data.max_length,
        )
    if spec.stage == "kto":
        from trl import KTOConfig

        kto = pref.kto
        return KTOConfig(
            **common,
            beta=kto.beta,
            loss_type=kto.loss_type,
            desirable_weight=kto.desirable_weight,
            undesirable_weight=kto.undesirable_weight,
            precompute_ref_log_probs=kto.precompute_ref_log_probs,
            max_length=spec.data.max_length,
        )
    if spec.stage == "distill":
        from trl import DistillationConfig

        distill = pref.distill
        common["include_num_input_tokens_seen"] = "no"  # the batches are prompts; the student samples the rest
        return DistillationConfig(
            **common,
            beta=distill.beta,
            temperature=distill.temperature,
            top_p=distill.top_p,
            max_completion_length=distill.max_completion_length,
        )
    weights = [f.weight for f in pref.reward.functions] + ([pref.reward.model_weight] if pref.reward.model else [])
    common["include_num_input_tokens_seen"] = "no"  # the batches are prompts; tokens are counted by TRL
    if spec.stage == "rloo":
        from trl import RLOOConfig

        rloo = pref.rloo
        return RLOOConfig(
            **common,
            num_generations=rloo.num_generations,
            max_completion_length=rloo.max_completion_length,
            temperature=rloo.temperature,
            top_p=rloo.top_p,
            beta=rloo.beta,
            epsilon=rloo.epsilon,
            num_iterations=rloo.num_iterations,
            normalize_advantages=rloo.normalize_advantages,
            reward_weights=weights,
        )
    from trl import GRPOConfig

    grpo = pref.grpo
    return GRPOConfig(
        **common,
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature,
        top_p=grpo.top_p,
        beta=grpo.beta,
        epsilon=grpo.epsilon,
        reward_weights=weights,
    )


def _precomputes_reference(spec: TrainSpec, pref: StageSections) -> bool:
    """Whether TRL computes the reference log-probs once before training (dpo/kto precompute_ref_log_probs)."""
    return (spec.stage == "dpo" and pref.dpo.precompute_ref_log_probs) or (
        spec.stage == "kto" and pref.kto.precompute_ref_log_probs
    )


def _reference_copy(
    spec: TrainSpec, pref: StageSections, model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel | None:
    """DPO's or KTO's frozen reference when it must be a second model: full or freeze training, computed live."""
    # with an adapter the reference is the base with the adapter disabled (TRL does that when ref_model is None);
    # precomputed log-probs need none at all
    if spec.peft.method in ("full", "freeze") and not _precomputes_reference(spec, pref):
        return load_model(model_cfg, tokenizer)
    return None


def on_shared_disk(splits: dict, run_dir: Path, rank: int) -> dict:
    """The datasets as files in the run directory, written by rank 0 and read by every rank."""
    # TRL caches the precomputed reference log-probs next to a dataset's files and the other ranks read rank 0's
    # cache; an in-memory dataset's cache goes to each process's own temporary folder, where they cannot find it
    folder = run_dir / "datasets"
    if rank == 0:
        for name, split in splits.items():
            split.save_to_disk(str(folder / name))
    dist.barrier()
    return {name: datasets.load_from_disk(str(folder / name)) for name in splits}


def run_preference_stage(spec: TrainSpec, pref: StageSections, run_dir: Path, rank: int) -> dict:
    """Train one worker's share of a reward, dpo, kto, grpo, rloo or distill job and, with the other ranks, write
    `final/`."""
    training, peft = spec.training, spec.peft
    set_seed(training.seed)
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    tokenizer = load_tokenizer(spec.model, spec.data.chat_template)
    stage = stage_spec(spec.stage)
    has_eval = stage.evaluates(spec.data)  # the online RL stages score held-out prompts on the driver instead
    splits = rlhf_datasets(spec.stage, spec.data, tokenizer, training.seed)  # TRL tokenises them
    if distributed and world > 1 and _precomputes_reference(spec, pref):
        splits = on_shared_disk(splits, run_dir, rank)
    task = stage.task
    if "reward" in stage.sections:
        reward_funcs = reward_functions(spec.stage, pref, allow_pickle=spec.model.allow_pickle)
    if spec.stage == "distill":
        assert pref.distill.teacher is not None  # JobConfig requires it
        check_teacher(pref.distill.teacher, tokenizer, allow_pickle=spec.model.allow_pickle)

    model_cfg = spec.model
    if rank == 0:
        set_status(run_dir, "loading the model")
    # RLOO with a KL term loads its reference from the policy's folder (TRL's create_model_from_path)
    live_reference = spec.stage in REFERENCE_STAGES or (spec.stage == "rloo" and pref.rloo.beta > 0)
    if model_cfg.init == "scratch" and (peft.method in ("lora", "qlora") or live_reference):
        # an adapter needs its base on disk, and the reference must be the very weights the policy starts from
        model_cfg = materialize_scratch_base(spec, tokenizer, run_dir, rank, distributed)
    model, args = load_trained_model(
        spec, model_cfg, tokenizer, lambda: _stage_config(spec, pref, run_dir, has_eval), task=task
    )
    # DPO and KTO get their adapter from TRL (peft_config), so the reference is the base with the adapter
    # disabled; handed a PeftModel, TRL would keep a cloned "ref" adapter instead
    adapter_by_trl = spec.stage in REFERENCE_STAGES and peft.method in ("lora", "qlora")
    model = apply_finetune_method(
        model, peft, training.gradient_checkpointing, task=task, wrap_adapter=not adapter_by_trl
    )
    if rank == 0:
        print(memory_footprint(model), flush=True)

    preemption = PreemptionCallback(run_dir)
    if rank == 0:
        set_status(run_dir, DEEPSPEED_STATUS)
    callbacks = run_callbacks(spec, run_dir, rank, training.batch_size * training.grad_accum * world, preemption)
    common = dict(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("eval"),
        processing_class=tokenizer,
        callbacks=callbacks,
        nonfinite_guard=NonFiniteGuard(run_dir, training.max_nonfinite_steps, rank),
    )
    if spec.stage == "reward":
        from trl import RewardTrainer

        trainer = guarded(RewardTrainer)(**common)
    elif spec.stage in REFERENCE_STAGES:
        from trl import DPOTrainer, KTOTrainer

        trainer = guarded(DPOTrainer if spec.stage == "dpo" else KTOTrainer)(
            ref_model=_reference_copy(spec, pref, model_cfg, tokenizer),
            peft_config=lora_config(peft) if adapter_by_trl else None,
            **common,
        )
    elif spec.stage == "distill":
        from trl import DistillationTrainer

        # loaded like the student (dtype, attention), after the DeepSpeed-aware arguments, so ZeRO-3 shards it too
        teacher = load_model(spec.model.loading(pref.distill.teacher), tokenizer)
        _check_vocab_sizes(model, teacher, pref.distill.teacher or "")
        trainer = guarded(DistillationTrainer)(teacher_model=teacher, **common)
    else:
        from trl import GRPOTrainer, RLOOTrainer

        trainer = guarded(GRPOTrainer if spec.stage == "grpo" else RLOOTrainer)(reward_funcs=reward_funcs, **common)
    trainer.remove_callback(PrinterCallback)
    if peft.method == "qlora" and not args.bf16:
        keep_adapters_in_fp32(trainer.model)
    return train_and_publish(trainer, tokenizer, run_dir, spec.output.resume, has_eval, rank, preemption)


def ray_worker(payload: dict, rank: int) -> None:
    """Ray entry point of the preference stages: rebuild the specs from `payload` and run this worker."""
    run_dir = start_ray_worker(payload, rank)
    run_preference_stage(
        TrainSpec.model_validate(payload["spec"]), StageSections.model_validate(payload["sections"]), run_dir, rank
    )


def run_in_process(payload: dict) -> None:
    """`--single`: the whole preference job in this process."""
    run_preference_stage(
        TrainSpec.model_validate(payload["spec"]),
        StageSections.model_validate(payload["sections"]),
        Path(payload["run_dir"]),
        rank=0,
    )
