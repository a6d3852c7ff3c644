"""One SPMD worker of a `pretrain` or `sft` job: data, model, DeepSpeed, TRL SFTTrainer, final save.

Read `run_training` top to bottom: it is the whole recipe. `ray_worker` is the entry point a Ray worker
of the job's group (`cluster.worker_group`) runs.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from training.callbacks import (
    CompleteCheckpointCallback,
    Heartbeat,
    MetricsCallback,
    PreemptionCallback,
    TrackingCallback,
    close_trackers,
)
from training.chat_templates import stop_at_end_of_turn
from training.config import ADAPTER_METHODS, ModelConfig, TrainingConfig, TrainSpec
from training.deepspeed_config import build_deepspeed_config, import_deepspeed_without_mlflow, zero_stage
from training.errors import UserError
from training.faults import apply_faults
from training.finetune_method import (
    AdaLoraRankBudget,
    SavesPromptAdapters,
    apply_finetune_method,
    keep_adapters_in_fp32,
    memory_footprint,
    quantization_config,
    zero3_shares,
)
from training.model import load_model, load_tokenizer, resolve_dtype
from training.nonfinite import NonFiniteGuard, SkipsNonFiniteSteps
from training.packing import PackedRowsCollator
from training.run_dir import (
    DiskFull,
    ReportsFullDisk,
    disk_full_message,
    out_of_space,
    publish_final,
    read_status,
    resume_checkpoint,
    set_status,
)
from training.tokenize import default_cache_dir, prepare_datasets
from training.tracking import apply_tracker_env

log = logging.getLogger(__name__)
DEEPSPEED_STATUS = "building the DeepSpeed engine (the first run on a machine also compiles DeepSpeed's CPU comm op)"


def _precision_flags(training: TrainingConfig) -> dict:
    precision = training.precision
    if precision == "auto":
        precision = "bf16" if resolve_dtype("auto") == torch.bfloat16 else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def common_trainer_kwargs(spec: TrainSpec, run_dir: Path, has_eval: bool) -> dict:
    """TrainingArguments fields every stage shares: schedule, batch, eval/save cadence, DeepSpeed, devices."""
    training, output = spec.training, spec.output
    cuda = torch.cuda.is_available()
    warmup = training.warmup_steps if training.warmup_steps > 0 else training.warmup_ratio
    return dict(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.grad_accum,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        seed=training.seed,
        data_seed=training.seed,
        gradient_checkpointing=training.gradient_checkpointing,
        # the step-0 eval is the "before" figure; calling evaluate() before train() breaks DeepSpeed's wrapper
        eval_strategy="steps" if has_eval else "no",
        eval_steps=training.eval_steps or 1_000_000_000,
        eval_on_start=has_eval,
        save_strategy="steps" if output.save_steps else "no",
        save_steps=output.save_steps or 500,
        save_total_limit=None,  # training.run_dir.CompleteCheckpointCallback keeps output.keep_last
        logging_steps=training.logging_steps,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda,
        # a backend makes accelerate expect a process group; a single process (--single) has none
        ddp_backend=("nccl" if cuda else "gloo") if dist.is_initialized() else None,
        deepspeed=build_deepspeed_config(spec.deepspeed, cuda=cuda) if spec.deepspeed is not None else None,
        dataloader_num_workers=0,
        optim=training.optim,
        neftune_noise_alpha=training.neftune_noise_alpha,
        **best_metric_flags(spec),
        **_precision_flags(training),
    )


def best_metric_flags(spec: TrainSpec) -> dict:
    """The metric the trainer tracks as best: for training.early_stopping and output.keep_best."""
    stopping, keep_best = spec.training.early_stopping, spec.output.keep_best
    if stopping is not None:
        return {"metric_for_best_model": stopping.metric, "greater_is_better": stopping.mode == "max"}
    if keep_best is not None:
        return {"metric_for_best_model": keep_best, "greater_is_better": spec.output.best_mode == "max"}
    return {}


class StartingModelIsNoCandidate(TrainerCallback):
    """The step-0 evaluation is the "before" figure, not a best model: no checkpoint holds it to keep or return to."""

    def on_step_begin(self, args, state, control, **kw) -> None:
        if state.global_step == 0:
            state.best_metric, state.best_global_step, state.best_model_checkpoint = None, None, None


class ZeroShareReport(TrainerCallback):
    """Log, once DeepSpeed holds the model, the share of the weights ZeRO-3 keeps on this rank."""

    def on_train_begin(self, args, state, control, model=None, **kw) -> None:
        line = zero3_shares(model) if model is not None else None
        if line:
            log.info("%s", line)


def run_callbacks(spec: TrainSpec, run_dir: Path, rank: int, samples_per_step: int, preemption) -> list:
    """The callbacks every HF-trainer stage runs: metrics, checkpoints, preemption, early stopping, heartbeat."""
    from transformers import EarlyStoppingCallback

    stopping = spec.training.early_stopping
    return [
        MetricsCallback(run_dir / "metrics.jsonl", samples_per_step),
        TrackingCallback(spec.training.report_to, run_dir, rank),  # after MetricsCallback: forwards what it wrote
        CompleteCheckpointCallback(run_dir, spec.output.keep_last, keep_best=spec.output.keep_best is not None),
        preemption,
        *([EarlyStoppingCallback(stopping.patience, stopping.threshold)] if stopping else []),
        StartingModelIsNoCandidate(),
        ZeroShareReport(),
        *([AdaLoraRankBudget()] if spec.peft.method == "adalora" else []),
        Heartbeat(run_dir, rank),  # last: see its docstring
    ]


def build_trainer_args(spec: TrainSpec, run_dir: Path, has_eval: bool):
    """TRL SFTConfig for pretrain/sft; must exist before the model for ZeRO-3 init."""
    from trl import SFTConfig

    return SFTConfig(
        **common_trainer_kwargs(spec, run_dir, has_eval),
        max_length=spec.data.max_length,
        packing=False,  # SFT rows were packed (and cached) at tokenisation; see training/packing.py
        dataset_num_proc=spec.data.num_proc if spec.data.num_proc > 1 else None,
    )


def guarded(trainer_class: type) -> type:
    """`trainer_class` that skips NaN/inf steps (training.nonfinite), reports a disk filled by a save, and saves
    and resumes prompt/prefix adapters (training.finetune_method.SavesPromptAdapters)."""
    bases = (SkipsNonFiniteSteps, ReportsFullDisk, SavesPromptAdapters, trainer_class)
    return type(trainer_class.__name__, bases, {})


def choose_collator(spec: TrainSpec, model: torch.nn.Module, pad_token_id: int):
    """Packed SFT rows: flattened varlen for flash-attn, per-row block masks otherwise; else TRL's default."""
    if spec.stage != "sft" or not spec.data.packing:
        return None
    if model.config._attn_implementation == "flash_attention_2":
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)
    return PackedRowsCollator(pad_token_id=pad_token_id)


def materialize_scratch_base(spec: TrainSpec, tokenizer, run_dir: Path, rank: int, distributed: bool) -> ModelConfig:
    """An adapter needs a base on disk: save the seeded scratch model to RUN_DIR/base and load from there."""
    base = run_dir / "base"
    if rank == 0 and not (base / "config.json").exists():
        staging = run_dir / "base.staging"
        shutil.rmtree(staging, ignore_errors=True)
        load_model(spec.model, tokenizer).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(base)
    if distributed:
        dist.barrier()
    return spec.model.model_copy(update={"init": "pretrained", "name_or_path": str(base), "architecture": None})


def run_training(spec: TrainSpec, run_dir: Path, rank: int) -> dict:
    """Train one worker's share of the job and, together with the other ranks, write `final/`."""
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer

    training, data, output, peft = spec.training, spec.data, spec.output, spec.peft
    set_seed(training.seed)
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    tokenizer = load_tokenizer(spec.model, spec.data.chat_template)
    has_eval = bool(data.eval) or data.eval_fraction > 0
    model_cfg = spec.model
    if rank == 0:
        set_status(run_dir, "loading the model")
    if peft.method in ADAPTER_METHODS and model_cfg.init == "scratch":
        model_cfg = materialize_scratch_base(spec, tokenizer, run_dir, rank, distributed)
    # A from-scratch model is built before the trainer args register DeepSpeed: under ZeRO-3's
    # zero.Init each rank would draw the random weights per partition, so the same seed would give
    # other weights than ZeRO-0/1/2. Pretrained weights load after, inside zero.Init (sharded).
    model = load_model(model_cfg, tokenizer) if model_cfg.init == "scratch" else None
    args = build_trainer_args(spec, run_dir, has_eval)

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

    if model is None:
        zero3 = zero_stage(spec.deepspeed) == 3
        quantization = quantization_config(peft, zero3=zero3) if peft.method == "qlora" else None
        model = load_model(model_cfg, tokenizer, quantization)
    model.config.use_cache = False  # no KV cache while training (and packed batches need it off)
    samples_per_step = training.batch_size * training.grad_accum * world
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
    trainer = guarded(SFTTrainer)(
        nonfinite_guard=NonFiniteGuard(run_dir, training.max_nonfinite_steps, rank),
        model=model,
        args=args,
        data_collator=choose_collator(spec, model, tokenizer.pad_token_id),
        train_dataset=splits["train"],
        eval_dataset=splits.get("eval"),
        processing_class=tokenizer,
        callbacks=run_callbacks(spec, run_dir, rank, samples_per_step, preemption),
    )
    trainer.remove_callback(PrinterCallback)  # its dict-per-step print is metrics.jsonl's job
    if peft.method == "qlora" and not args.bf16:
        keep_adapters_in_fp32(trainer.model)

    return train_and_publish(trainer, tokenizer, run_dir, output.resume, has_eval, rank, preemption)


def train_and_publish(
    trainer, tokenizer, run_dir: Path, resume: str, has_eval: bool, rank: int, preemption: PreemptionCallback
) -> dict:
    """Train (resuming when asked), evaluate once more, and write `final/` atomically; every rank calls this."""
    distributed = dist.is_available() and dist.is_initialized()
    checkpoint = resume_checkpoint(run_dir, resume)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except BaseException as exc:
        close_trackers(trainer, failed=True)  # W&B and MLflow runs end marked failed, not left running
        if isinstance(exc, KeyError) and "metric_for_best_model" in str(exc):
            # the trainer's own message lists the metrics the evaluation has
            raise UserError(f"training.early_stopping.metric / output.keep_best: {str(exc).strip(chr(34))}") from None
        raise
    if preemption.stopped:  # a checkpoint was written; final/ waits for the rerun that finishes the job
        close_trackers(trainer)
        return {"global_step": trainer.state.global_step, "preempted": True}
    step = trainer.state.global_step
    evaluated_last = any(
        any(k.startswith("eval_") for k in h) and h.get("step") == step for h in trainer.state.log_history
    )
    metrics = trainer.evaluate() if has_eval and not evaluated_last else {}
    close_trackers(trainer)  # only now: this last evaluation comes after training ends

    # Every rank takes part in the save (ZeRO-3 gathers shards); rank 0 publishes it atomically.
    # A LoRA run's final/ is the adapter (with its base's path); `tuneyard export --merge` folds it in.
    staging = run_dir / "final.staging"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    if distributed:
        dist.barrier()
    try:
        trainer.save_model(str(staging))
        if distributed:
            dist.barrier()
        if rank == 0:
            tokenizer.save_pretrained(str(staging))
            stop_at_end_of_turn(staging, trainer.model, tokenizer)
            (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; final/ holds safetensors and JSON
            publish_final(staging, run_dir / "final")
    except Exception as exc:
        if not out_of_space(exc, staging):
            raise
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise DiskFull(disk_full_message("writing final/", run_dir)) from None
    if distributed:
        dist.barrier()
    return {"global_step": trainer.state.global_step, **metrics}


def redirect_output(log_path: Path) -> None:
    """Send this process's stdout/stderr (Python and C++ alike) to a log file; the console shows progress."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log_path, "a", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def watch_start_up(run_dir: Path, who: str) -> None:
    """Key this worker's extension cache by its own build, and put any wait on a build lock on the progress line."""
    from cluster.extensions import use_own_build_folder, watch_extension_locks

    use_own_build_folder()
    before: list[str] = []

    def report(text: str) -> None:
        if text:
            before.append(before[-1] if before else read_status(run_dir))
            set_status(run_dir, f"{who}: {text}")
        elif before:
            set_status(run_dir, before[0])
            before.clear()

    watch_extension_locks(os.environ["TORCH_EXTENSIONS_DIR"], report)


def start_ray_worker(payload: dict, rank: int) -> Path:
    """In a Ray worker of the job's group: its run directory; the worker's output goes to RUN_DIR/logs."""
    import datasets
    import ray

    run_dir = Path(payload["run_dir"])
    apply_faults(payload.get("faults", {}))
    apply_tracker_env(payload.get("tracker_env", {}))
    if payload["spec"].get("deepspeed"):
        import_deepspeed_without_mlflow()
    redirect_output(run_dir / "logs" / f"worker-{rank}.log")
    watch_start_up(run_dir, f"rank {rank}")
    log.info("rank %d (pid %d) runs on Ray node %s", rank, os.getpid(), ray.get_runtime_context().get_node_id())
    datasets.disable_progress_bars()
    return run_dir


def ray_worker(payload: dict, rank: int) -> None:
    """Ray entry point of pretrain/sft: rebuild the worker's spec from `payload` and run it."""
    run_dir = start_ray_worker(payload, rank)
    run_training(TrainSpec.model_validate(payload["spec"]), run_dir, rank)
