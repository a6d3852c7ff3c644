"""One SPMD worker of a `pretrain` or `sft` job: data, model, DeepSpeed, TRL SFTTrainer, final save.

Read `run_training` top to bottom: it is the whole recipe. `ray_worker` is the entry point a Ray worker
of the job's group (`tuneyard.cluster.worker_group`) runs.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from tuneyard.training.callbacks import PreemptionCallback
from tuneyard.training.config import ADAPTER_METHODS, TrainSpec
from tuneyard.training.data.packing import PackedRowsCollator
from tuneyard.training.data.tokenize import default_cache_dir, prepare_datasets
from tuneyard.training.finetune_method import (
    apply_finetune_method,
    keep_adapters_in_fp32,
    memory_footprint,
)
from tuneyard.training.model import load_tokenizer
from tuneyard.training.nonfinite import NonFiniteGuard
from tuneyard.training.run_dir import set_status
from tuneyard.training.sequence_parallel import (
    attention_functions_restored,
    keep_packed_examples_apart,
    sequence_parallel_args,
    with_sequence_parallel,
)
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


def build_trainer_args(spec: TrainSpec, run_dir: Path, has_eval: bool):
    """TRL SFTConfig for pretrain/sft; must exist before the model for ZeRO-3 init."""
    from trl import SFTConfig

    return SFTConfig(
        **common_trainer_kwargs(spec, run_dir, has_eval),
        max_length=spec.data.max_length,
        packing=False,  # SFT rows were packed (and cached) at tokenisation; see training/data/packing.py
        dataset_num_proc=spec.data.num_proc if spec.data.num_proc > 1 else None,
        **sequence_parallel_args(spec),
    )


def choose_collator(spec: TrainSpec, model: torch.nn.Module, pad_token_id: int, pad_to_multiple_of: int = 1):
    """Packed SFT rows: flattened varlen for flash-attn, per-row block masks otherwise; else TRL's default.

    Under sequence parallelism packed rows stay [rows, width] for every kernel (each rank takes a slice of every
    row, so the width is padded to `pad_to_multiple_of`); the examples are told apart by their position ids."""
    if spec.stage != "sft" or not spec.data.packing:
        return None
    if model.config._attn_implementation == "flash_attention_2" and spec.training.sequence_parallel == 1:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)
    return PackedRowsCollator(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)


def run_training(spec: TrainSpec, run_dir: Path, rank: int) -> dict:
    """Train one worker's share of the job and, together with the other ranks, write `final/`."""
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer

    training, data, output, peft = spec.training, spec.data, spec.output, spec.peft
    set_seed(training.seed)
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    tokenizer = load_tokenizer(spec.model, spec.data.chat_template)
    has_eval = stage_spec(spec.stage).evaluates(data)
    model_cfg = spec.model
    if rank == 0:
        set_status(run_dir, "loading the model")
    if peft.method in ADAPTER_METHODS and model_cfg.init == "scratch":
        model_cfg = materialize_scratch_base(spec, tokenizer, run_dir, rank, distributed)
    model, args = load_trained_model(spec, model_cfg, tokenizer, lambda: build_trainer_args(spec, run_dir, has_eval))

    # On Ray the driver built the cache before any process group existed (launch/prepare.py), so rank 0
    # finds it warm and the barrier is brief. Started otherwise (torchrun), rank 0 builds it while the others wait.
    cache_dir = default_cache_dir(data, output)
    if rank == 0:
        set_status(run_dir, "reading the tokenised data")
        splits, warm = prepare_datasets(spec.stage, data, tokenizer, training.seed, cache_dir)
        log.info("tokenised data: %s cache", "warm" if warm else "cold")
    if distributed:
        dist.barrier()
    if rank != 0:
        splits, _ = prepare_datasets(spec.stage, data, tokenizer, training.seed, cache_dir)

    # the ranks of a sequence-parallel group train on the same rows: world / N different batches per step
    samples_per_step = training.batch_size * training.grad_accum * (world // training.sequence_parallel)
    steps = training.max_steps
    if steps <= 0:
        steps = math.ceil(training.epochs * math.ceil(len(splits["train"]) / samples_per_step))
    tokenizer_path = model_cfg.tokenizer or model_cfg.name_or_path  # prompt tuning reads prompt_init_text with it
    model = apply_finetune_method(
        model, peft, training.gradient_checkpointing, total_steps=steps, tokenizer_path=tokenizer_path
    )
    if rank == 0:
        print(memory_footprint(model), flush=True)
    preemption = PreemptionCallback(run_dir)
    if rank == 0:
        set_status(run_dir, DEEPSPEED_STATUS)
    trainer = with_sequence_parallel(guarded(SFTTrainer), spec)(
        nonfinite_guard=NonFiniteGuard(run_dir, training.max_nonfinite_steps, rank),
        model=model,
        args=args,
        data_collator=choose_collator(spec, model, tokenizer.pad_token_id, args.pad_to_multiple_of or 1),
        train_dataset=splits["train"],
        eval_dataset=splits.get("eval"),
        processing_class=tokenizer,
        callbacks=run_callbacks(spec, run_dir, rank, samples_per_step, preemption),
    )
    trainer.remove_callback(PrinterCallback)  # its dict-per-step print is metrics.jsonl's job
    if peft.method == "qlora" and not args.bf16:
        keep_adapters_in_fp32(trainer.model)

    with attention_functions_restored():
        keep_packed_examples_apart(spec, model.config._attn_implementation)
        return train_and_publish(trainer, tokenizer, run_dir, output.resume, has_eval, rank, preemption)


def ray_worker(payload: dict, rank: int) -> None:
    """Ray entry point of pretrain/sft: rebuild the worker's spec from `payload` and run it."""
    run_dir = start_ray_worker(payload, rank)
    run_training(TrainSpec.model_validate(payload["spec"]), run_dir, rank)


def run_in_process(payload: dict) -> None:
    """`--single`: the whole pretrain/sft job in this process."""
    run_training(TrainSpec.model_validate(payload["spec"]), Path(payload["run_dir"]), rank=0)
