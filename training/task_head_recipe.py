"""One SPMD worker of a `classify` or `token-classify` job: a task head on an encoder or decoder, HF Trainer.

Read `run_task_head` top to bottom, like `causal_lm_recipe.run_training`: data and label names, the model with
its head, the peft method, the trainer, then the shared train-and-publish step. The eval metrics are
scikit-learn's accuracy and macro-F1 (classify) and seqeval's entity-level precision, recall and F1
(token-classify). `peft.method: feature-based` instead fits a logistic regression on the frozen model's
mean-pooled embeddings (`fit_on_features`). `ray_worker` is the Ray entry point.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import PrinterCallback, set_seed

from tuneyard.training.callbacks import PreemptionCallback
from tuneyard.training.config import ADAPTER_METHODS, PeftSection, TrainSpec
from tuneyard.training.data.labels import HEAD_MODULES, IGNORED, task_datasets
from tuneyard.training.errors import UserError
from tuneyard.training.finetune_method import (
    apply_finetune_method,
    classifier_pooler,
    keep_adapters_in_fp32,
    memory_footprint,
    parameter_counts,
)
from tuneyard.training.metrics import append_metrics
from tuneyard.training.model import load_tokenizer
from tuneyard.training.nonfinite import NonFiniteGuard
from tuneyard.training.run_dir import publish_final, set_status
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
HEAD_NAMES = ("classifier", "score")  # the head of BERT-family models, and of decoders


def classification_metrics(eval_pred) -> dict[str, float]:
    """Accuracy and macro-F1 of a sequence classifier's eval predictions (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    predicted = np.asarray(logits).argmax(-1)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1": float(f1_score(labels, predicted, average="macro")),
    }


def entity_metrics(names: list[str]) -> Callable[..., dict[str, float]]:
    """Entity-level precision, recall and F1 (seqeval) of a token tagger, on the tokens that carry a tag."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    def compute(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        predicted = np.asarray(logits).argmax(-1)
        truth, guess = [], []
        for row_pred, row_labels in zip(predicted, labels, strict=True):
            kept = row_labels != IGNORED
            truth.append([names[i] for i in row_labels[kept]])
            guess.append([names[i] for i in row_pred[kept]])
        return {
            "precision": float(precision_score(truth, guess, zero_division=0)),
            "recall": float(recall_score(truth, guess, zero_division=0)),
            "f1": float(f1_score(truth, guess, zero_division=0)),
        }

    return compute


def head_only_saving(model: torch.nn.Module, peft: PeftSection) -> PeftSection:
    """The peft section with the fresh (random) head trained in full beside an adapter, unless the job names it."""
    if peft.method not in ADAPTER_METHODS or peft.modules_to_save:
        return peft
    heads = [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)]
    # BERT's pooler trains with its classifier: an adapter on its frozen weights learns far slower (68 % vs 88 % on
    # MiniLM and the generated reviews after 150 steps of LoRA), as the sentence-transformers weights never trained it
    heads += ["pooler"] if classifier_pooler(model) is not None else []
    return peft.model_copy(update={"modules_to_save": heads})


def collator(stage: str, tokenizer):
    """Pads a batch: texts with their one label, or tokens with their per-token labels (-100 on padding)."""
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    if stage == "token-classify":
        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORED)
    return DataCollatorWithPadding(tokenizer)


def run_task_head(spec: TrainSpec, run_dir: Path, rank: int) -> dict:
    """Train one worker's share of a classify or token-classify job and, with the other ranks, write `final/`."""
    from transformers import Trainer, TrainingArguments

    training, data, peft = spec.training, spec.data, spec.peft
    if peft.method == "feature-based":
        return fit_on_features(spec, run_dir, rank)
    set_seed(training.seed)
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    tokenizer = load_tokenizer(spec.model)
    if rank == 0:
        set_status(run_dir, "reading the data")
    splits, names = task_datasets(spec.stage, data, tokenizer, training.seed)  # small: every rank tokenises
    has_eval = "eval" in splits
    task = stage_spec(spec.stage).task

    model_cfg = spec.model
    if rank == 0:
        set_status(run_dir, "loading the model")
    if peft.method in ADAPTER_METHODS and model_cfg.init == "scratch":
        model_cfg = materialize_scratch_base(spec, tokenizer, run_dir, rank, distributed)
    metrics = entity_metrics(names) if spec.stage == "token-classify" else classification_metrics
    # the head starts random and trains in full: not a 4-bit layer under QLoRA
    model, args = load_trained_model(
        spec,
        model_cfg,
        tokenizer,
        lambda: TrainingArguments(**common_trainer_kwargs(spec, run_dir, has_eval)),
        task=task,
        labels=names,
        whole_modules=HEAD_MODULES,
    )
    samples_per_step = training.batch_size * training.grad_accum * world
    steps = training.max_steps
    if steps <= 0:
        steps = math.ceil(training.epochs * math.ceil(len(splits["train"]) / samples_per_step))
    model = apply_finetune_method(
        model, head_only_saving(model, peft), training.gradient_checkpointing, task=task, total_steps=steps
    )
    if rank == 0:
        print(memory_footprint(model), flush=True)
        trainable, total = parameter_counts(model)  # for the comparisons of methods (bench/bench_classic.py)
        append_metrics(
            run_dir / "metrics.jsonl",
            {"event": "parameters", "trainable_parameters": trainable, "total_parameters": total, "time": time.time()},
        )

    preemption = PreemptionCallback(run_dir)
    if rank == 0:
        set_status(run_dir, DEEPSPEED_STATUS)
    trainer = guarded(Trainer)(
        nonfinite_guard=NonFiniteGuard(run_dir, training.max_nonfinite_steps, rank),
        model=model,
        args=args,
        data_collator=collator(spec.stage, tokenizer),
        train_dataset=splits["train"],
        eval_dataset=splits.get("eval"),
        processing_class=tokenizer,
        compute_metrics=metrics,
        callbacks=run_callbacks(spec, run_dir, rank, samples_per_step, preemption),
    )
    trainer.remove_callback(PrinterCallback)
    # The heads' forward takes **kwargs, so the trainer would pass num_items_in_batch and multiply the loss by the
    # number of ranks; BERT's heads (and every sequence head) ignore it and return a batch mean, so 2 ranks would
    # report and train on twice the loss. A per-rank mean, averaged by DeepSpeed/DDP, is right for every head.
    trainer.model_accepts_loss_kwargs = False
    if peft.method == "qlora" and not args.bf16:
        keep_adapters_in_fp32(trainer.model)
    result = train_and_publish(trainer, tokenizer, run_dir, spec.output.resume, has_eval, rank, preemption)
    if rank == 0 and peft.method in ADAPTER_METHODS and (run_dir / "final").is_dir():
        write_label_names(run_dir / "final", names)
    return result


def write_label_names(folder: Path, names: list[str]) -> None:
    """Record the label names beside an adapter (whose folder has no model config): export reads them back."""
    (folder / "labels.json").write_text(json.dumps(names) + "\n")


def mean_pooled(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int, batch: int = 64) -> np.ndarray:
    """The frozen model's last hidden states averaged over each text's tokens (padding left out)."""
    chunks = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            encoded = tokenizer(
                texts[start : start + batch], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )
            encoded.pop("token_type_ids", None)
            hidden = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            chunks.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().numpy())
    return np.concatenate(chunks)


def fit_on_features(spec: TrainSpec, run_dir: Path, rank: int) -> dict:
    """peft.method feature-based: embed with the frozen model, fit scikit-learn's logistic regression, score eval.

    No gradient reaches the model, so there is nothing to shard: rank 0 does the work, the other ranks wait.
    final/ holds the frozen model, its tokenizer, and the regression's weights with the label names.
    """
    from safetensors.numpy import save_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModel

    from tuneyard.training.data.labels import check_known_labels, label_names
    from tuneyard.training.data.sources import read_splits

    distributed = dist.is_available() and dist.is_initialized()
    if rank == 0:
        started = time.time()
        set_status(run_dir, "embedding the data with the frozen model")
        if spec.model.init == "scratch":
            raise UserError("peft.method feature-based embeds with a pretrained model: set model.name_or_path")
        train, held = read_splits(spec.data, spec.training.seed, keep_where=True)
        names = label_names(spec.stage, train)
        if held is not None:
            check_known_labels(spec.stage, held, names)
        tokenizer = load_tokenizer(spec.model)
        model = AutoModel.from_pretrained(spec.model.name_or_path, dtype=torch.float32)
        ids = {name: i for i, name in enumerate(names)}
        features = mean_pooled(model, tokenizer, [r["text"] for r in train], spec.data.max_length)
        targets = np.array([ids[str(r["label"])] for r in train])
        regression = LogisticRegression(max_iter=2000, random_state=spec.training.seed).fit(features, targets)
        metrics: dict = {"step": 0, "train_seconds": time.time() - started}
        if held is not None:
            predicted = regression.predict(
                mean_pooled(model, tokenizer, [r["text"] for r in held], spec.data.max_length)
            )
            truth = np.array([ids[str(r["label"])] for r in held])
            metrics["eval_accuracy"] = float(accuracy_score(truth, predicted))
            metrics["eval_f1"] = float(f1_score(truth, predicted, average="macro"))
        metrics["trainable_parameters"] = int(regression.coef_.size + regression.intercept_.size)
        metrics["frozen_parameters"] = parameter_counts(model)[1]
        append_metrics(run_dir / "metrics.jsonl", metrics)
        staging = run_dir / "final.staging"
        model.config.update({"id2label": dict(enumerate(names)), "label2id": ids})
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        coef = regression.coef_.astype(np.float32)
        intercept = regression.intercept_.astype(np.float32)
        if len(names) == 2:  # scikit-learn keeps one row for two classes: as logits, class 0 scores 0
            coef, intercept = np.stack([np.zeros_like(coef[0]), coef[0]]), np.array([0.0, intercept[0]], np.float32)
        save_file({"weight": coef, "bias": intercept}, str(staging / "logistic_regression.safetensors"))
        write_label_names(staging, names)
        publish_final(staging, run_dir / "final")
    if distributed:
        dist.barrier()
    return metrics if rank == 0 else {}


def ray_worker(payload: dict, rank: int) -> None:
    """Ray entry point of classify/token-classify: rebuild the worker's spec from `payload` and run it."""
    run_dir = start_ray_worker(payload, rank)
    run_task_head(TrainSpec.model_validate(payload["spec"]), run_dir, rank)


def run_in_process(payload: dict) -> None:
    """`--single`: the whole classify/token-classify job in this process."""
    run_task_head(TrainSpec.model_validate(payload["spec"]), Path(payload["run_dir"]), rank=0)
