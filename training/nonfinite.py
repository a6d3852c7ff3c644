"""Skipping optimizer steps whose loss or gradients are not finite, and stopping after too many in a row.

How a step is skipped, on every path the trainers take:
- The ranks agree on the loss first: one all-reduce per micro-batch says whether any rank's loss
  is NaN/inf. If so, every rank multiplies its loss by NaN, so every rank's gradients are NaN.
- DeepSpeed ZeRO 1-3 then drop the step themselves (their overflow check: no update, no LR step).
- A plain torch optimizer (no DeepSpeed, or ZeRO-0) gets a step pre-hook that removes non-finite
  gradients before it runs; AdamW leaves a parameter without a gradient untouched (weights and moments).
Finite losses with NaN gradients take the same two paths. `NonFiniteGuard` counts the skipped steps,
records each one in metrics.jsonl, and past `training.max_nonfinite_steps` in a row stops the run with
`NonFiniteTraining`, before that step could be checkpointed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuneyard.training.errors import TrainingFailed
from tuneyard.training.faults import nan_loss_steps
from tuneyard.training.metrics import append_metrics
from tuneyard.training.run_dir import complete_checkpoints


class NonFiniteTraining(TrainingFailed):
    """Too many optimizer steps in a row had a NaN/inf loss or gradients."""


def any_rank_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when `flag` is set on this rank or any other, so every rank takes the same branch."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def innermost_torch_optimizer(optimizer: object) -> torch.optim.Optimizer | None:
    """The torch optimizer inside accelerate's and DeepSpeed's wrappers (they keep it as `.optimizer`)."""
    seen = 0
    while optimizer is not None and seen < 8:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def drop_nonfinite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Remove every gradient when any is NaN/inf, so the coming step changes nothing; True if it did."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads or all(bool(torch.isfinite(norm)) for norm in torch._foreach_norm(grads)):
        return False
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
    return True


class NonFiniteGuard(TrainerCallback):
    """Counts skipped non-finite steps and stops the run past `limit` in a row (all ranks together)."""

    def __init__(self, run_dir: Path, limit: int, rank: int):
        self.run_dir, self.limit, self.rank = Path(run_dir), limit, rank
        self.in_a_row: list[int] = []
        self.total = 0
        self.loss_was_nonfinite = False  # set by `checked_loss` during the current step
        self.grads_were_dropped = False  # set by the optimizer pre-hook
        self.trainer = None  # set by SkipsNonFiniteSteps
        self.engine = None  # a DeepSpeed engine counts its own skipped (overflow) steps
        self.engine_skipped = 0

    def checked_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The micro-batch's loss, made NaN on every rank when it is not finite on any one."""
        if self.rank == 0 and step in nan_loss_steps():
            loss = loss * float("nan")
        if any_rank_true(not bool(torch.isfinite(loss.detach()).all()), loss.device):
            self.loss_was_nonfinite = True
            return loss * float("nan")
        return loss

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw) -> None:
        """Hook the torch optimizer (built by now, DeepSpeed's too) so a NaN/inf step leaves the weights alone."""
        self.engine = getattr(self.trainer, "deepspeed", None)
        self.engine_skipped = getattr(self.engine, "skipped_steps", 0)
        inner = innermost_torch_optimizer(getattr(self.trainer, "optimizer", None))
        if inner is not None:

            def before_step(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
                self.grads_were_dropped |= drop_nonfinite_gradients(opt)

            inner.register_step_pre_hook(before_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw) -> None:
        engine_skipped = getattr(self.engine, "skipped_steps", 0)
        skipped = self.loss_was_nonfinite or self.grads_were_dropped or engine_skipped > self.engine_skipped
        self.engine_skipped = engine_skipped
        self.loss_was_nonfinite = self.grads_were_dropped = False
        device = "cuda" if torch.cuda.is_available() and dist.is_initialized() else "cpu"
        if not any_rank_true(skipped, device):
            self.in_a_row = []
            return
        self.in_a_row.append(state.global_step)
        self.total += 1
        if self.rank == 0:
            record = {"event": "nonfinite", "step": state.global_step, "in_a_row": len(self.in_a_row)}
            append_metrics(self.run_dir / "metrics.jsonl", {**record, "skipped": self.total, "time": time.time()})
        if len(self.in_a_row) > self.limit:
            raise NonFiniteTraining(self.stop_message())

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw) -> None:
        """A skipped step's loss is NaN in the log (the HF trainer would log a stand-in average)."""
        if logs is not None and "loss" in logs and self.in_a_row and self.in_a_row[-1] == state.global_step:
            logs["loss"] = float("nan")

    def stop_message(self) -> str:
        """One paragraph: which steps, what was kept, what to change."""
        return nonfinite_stop_message(self.in_a_row, self.limit, self.run_dir)


def nonfinite_stop_message(in_a_row: list[int], limit: int, run_dir: Path, where: str = "") -> str:
    """One paragraph for a run stopped by NaN/inf steps `in_a_row`: which, what was kept, what to change."""
    first, last = in_a_row[0], in_a_row[-1]
    steps = f"step {first}" if first == last else f"steps {first}-{last}"
    count = "1 step" if first == last else f"{len(in_a_row)} steps"
    done = complete_checkpoints(run_dir)
    kept = (
        f"The newest complete checkpoint, {done[-1]}, has good weights and a rerun resumes from it."
        if done
        else "No checkpoint was written before them (set output.save_steps to keep one)."
    )
    return (
        f"training stopped at step {last}{where}: the loss or gradients were NaN/inf for {count} in a row "
        f"({steps}), more than training.max_nonfinite_steps: {limit} allows; each of them was skipped, so the "
        f"weights are still those after step {first - 1}. {kept} Lower training.learning_rate, use precision "
        "bf16 or fp32 instead of fp16, look for broken rows in the data, or raise training.max_nonfinite_steps."
    )


class SkipsNonFiniteSteps:
    """Trainer mixin: every training loss goes through a `NonFiniteGuard` (put it before the TRL trainer)."""

    def __init__(self, *args, nonfinite_guard: NonFiniteGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.nonfinite_guard = nonfinite_guard
        nonfinite_guard.trainer = self
        # first, so its on_log marks a skipped step's loss before MetricsCallback writes it
        self.callback_handler.callbacks.insert(0, nonfinite_guard)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The trainer's loss; in training, NaN on every rank when any rank's is not finite."""
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training:
            return result
        loss = result[0] if return_outputs else result
        loss = self.nonfinite_guard.checked_loss(loss, self.state.global_step + 1)
        return (loss, *result[1:]) if return_outputs else loss
