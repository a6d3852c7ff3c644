"""What every Hugging Face trainer recipe shares: the trainer arguments, the callbacks, the guarded trainer class,
a scratch base written to disk for adapters, and the train-evaluate-publish ending that writes `final/`."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainingArguments

from tuneyard.training.callbacks import (
    CompleteCheckpointCallback,
    Heartbeat,
    MetricsCallback,
    PreemptionCallback,
    TrackingCallback,
    close_trackers,
)
from tuneyard.training.config import ModelConfig, TrainingConfig, TrainSpec
from tuneyard.training.data.chat_templates import stop_at_end_of_turn
from tuneyard.training.deepspeed_config import build_deepspeed_config, zero_stage
from tuneyard.training.errors import UserError
from tuneyard.training.finetune_method import AdaLoraRankBudget, SavesPromptAdapters, quantization_config, zero3_shares
from tuneyard.training.model import load_model, resolved_precision
from tuneyard.training.nonfinite import SkipsNonFiniteSteps
from tuneyard.training.run_dir import (
    DiskFull,
    ReportsFullDisk,
    disk_full_message,
    out_of_space,
    publish_final,
    resume_checkpoint,
)
from tuneyard.training.tiled_mlp import tile_mlps
from tuneyard.training.universal_checkpoint import loads_universal, universal_copy, untie_step_counters

log = logging.getLogger(__name__)


DEEPSPEED_STATUS = "building the DeepSpeed engine (the first run on a machine also compiles DeepSpeed's CPU comm op)"


def _precision_flags(training: TrainingConfig) -> dict:
    precision = resolved_precision(training.precision)
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
        save_total_limit=None,  # tuneyard.training.run_dir.CompleteCheckpointCallback keeps output.keep_last
        logging_steps=training.logging_steps,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda,
        # a backend makes accelerate expect a process group; a single process (--single) has none
        ddp_backend=("nccl" if cuda else "gloo") if dist.is_initialized() else None,
        deepspeed=trainer_deepspeed_config(spec, run_dir),
        dataloader_num_workers=0,
        optim=training.optim,
        neftune_noise_alpha=training.neftune_noise_alpha,
        **best_metric_flags(spec),
        **_precision_flags(training),
    )


def trainer_deepspeed_config(spec: TrainSpec, run_dir: Path) -> dict | None:
    """The DeepSpeed dict of the job; it loads the universal copy of a checkpoint written by another rank count."""
    if spec.deepspeed is None:
        return None
    config = build_deepspeed_config(spec.deepspeed, cuda=torch.cuda.is_available())
    checkpoint = resume_checkpoint(run_dir, spec.output.resume)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if loads_universal(checkpoint, world):
        if universal_copy(checkpoint) is None:  # the driver converts it before the workers start (launch/preflight)
            raise UserError(
                f"{checkpoint} was written by another number of ranks than this job's {world} and has no universal "
                "copy to load; start the job with `tuneyard train`, which makes one"
            )
        config["checkpoint"] = {"load_universal": True}
    return config


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


class SeparateStepCounters(TrainerCallback):
    """After a resume, each optimizer group counts its own Adam steps (`universal_checkpoint.untie_step_counters`)."""

    def on_train_begin(self, args, state, control, optimizer=None, **kw) -> None:
        if optimizer is not None and untie_step_counters(optimizer):
            log.info("the resumed optimizer's groups shared one step counter; each has its own now")


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
        SeparateStepCounters(),
        *([AdaLoraRankBudget()] if spec.peft.method == "adalora" else []),
        Heartbeat(run_dir, rank),  # last: see its docstring
    ]


def guarded(trainer_class: type) -> type:
    """`trainer_class` that skips NaN/inf steps (training/nonfinite.py), reports a disk filled by a save, and saves
    and resumes prompt/prefix adapters (finetune_method.SavesPromptAdapters)."""
    bases = (SkipsNonFiniteSteps, ReportsFullDisk, SavesPromptAdapters, trainer_class)
    return type(trainer_class.__name__, bases, {})


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


def load_trained_model(
    spec: TrainSpec,
    model_cfg: ModelConfig,
    tokenizer,
    make_args: Callable[[], TrainingArguments],
    task: str = "causal-lm",
    labels: list[str] | None = None,
    whole_modules: tuple[str, ...] = (),
) -> tuple[torch.nn.Module, TrainingArguments]:
    """The model a recipe trains and its trainer arguments, made in the order ZeRO-3 needs.

    A scratch model is built before the DeepSpeed-aware arguments exist: under ZeRO-3's zero.Init each rank would
    draw the random weights per partition, so the same seed would give other weights than ZeRO-0/1/2. Pretrained
    weights load after them, inside zero.Init, sharded as they load (4-bit under QLoRA, `whole_modules` excepted).
    """
    scratch = model_cfg.init == "scratch"
    model = load_model(model_cfg, tokenizer, task=task, labels=labels) if scratch else None
    args = make_args()
    if model is None:
        zero3 = zero_stage(spec.deepspeed) == 3
        quantization = quantization_config(spec.peft, zero3=zero3) if spec.peft.method == "qlora" else None
        if quantization is not None and whole_modules:
            quantization.llm_int8_skip_modules = list(whole_modules)
        model = load_model(model_cfg, tokenizer, quantization, task=task, labels=labels)
    model.config.use_cache = False  # no KV cache while training (and packed batches need it off)
    if task == "causal-lm":
        tile_mlps(model, spec)
    return model, args


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
