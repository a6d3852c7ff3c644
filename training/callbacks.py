"""The Trainer callbacks the HF-trainer stages run in their workers: metrics, checkpoints, heartbeats,
preemption and trackers.

They live apart from the run-directory, preemption and tracking helpers they call, because importing
transformers' Trainer modules (PEFT and bitsandbytes come with them) costs seconds of CPU, and the
driver, which only needs the helpers, would pay them at every `tuneyard` command.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuneyard.training.faults import pause_in_save, step_end_faults
from tuneyard.training.metrics import COMPLETE_MARKER, append_metrics
from tuneyard.training.preemption import RECORD_FILE, REQUEST_FILE
from tuneyard.training.run_dir import BEST_FILE, note_heartbeat, retire_old_checkpoints
from tuneyard.training.tracking import MetricsTail, Trackers

log = logging.getLogger(__name__)


class MetricsCallback(TrainerCallback):
    """Writes step metrics (loss, lr, grad_norm, tokens/s, samples/s) and eval loss to metrics.jsonl."""

    def __init__(self, path: Path, samples_per_step: int):
        self.path = Path(path)
        self.samples_per_step = samples_per_step
        self._last: tuple[float, int, float] | None = None  # (time, step, tokens seen)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw) -> None:
        if state.is_world_process_zero:
            append_metrics(
                self.path,
                {"event": "start", "step": state.global_step, "total_steps": state.max_steps, "time": time.time()},
            )
        self._last = (time.perf_counter(), state.global_step, float(state.num_input_tokens_seen or 0))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now, tokens = time.perf_counter(), float(state.num_input_tokens_seen or 0)
        # the stage's own figures too (DPO reward margins, GRPO rewards, ...), under TRL's names
        extra = {k: v for k, v in logs.items() if isinstance(v, int | float) and k not in ("learning_rate",)}
        record = {
            **extra,
            "step": state.global_step,
            "loss": logs["loss"],
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "epoch": state.epoch,
            "time": time.time(),
        }
        if self._last is not None and state.global_step > self._last[1]:
            elapsed = max(now - self._last[0], 1e-9)
            record["tokens_per_s"] = (tokens - self._last[2]) / elapsed
            record["samples_per_s"] = (state.global_step - self._last[1]) * self.samples_per_step / elapsed
        record = {k: v for k, v in record.items() if v is None or not isinstance(v, float) or math.isfinite(v)}
        append_metrics(self.path, record)
        self._last = (now, state.global_step, tokens)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics=None, **kw
    ) -> None:
        if state.is_world_process_zero and metrics and "eval_loss" in metrics:
            figures = {k: v for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, int | float)}
            append_metrics(self.path, {**figures, "step": state.global_step, "time": time.time()})
        # evaluation time is not training time: restart the rate window
        self._last = (time.perf_counter(), state.global_step, float(state.num_input_tokens_seen or 0))


class CompleteCheckpointCallback(TrainerCallback):
    """Marks a checkpoint complete once every rank has written its part, then retires older ones.

    The HF trainer's own rotation (save_total_limit) would delete the previous checkpoint before the
    new one is marked complete; the trainer is given no limit and this callback rotates instead.
    """

    def __init__(self, run_dir: Path, keep_last: int, keep_best: bool = False):
        self.run_dir, self.keep_last, self.keep_best = Path(run_dir), keep_last, keep_best

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # each rank writes its own shards and RNG state
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            pause_in_save("written", state.global_step, self.run_dir, rank=0)
            (folder / COMPLETE_MARKER).write_text(str(state.global_step))
            pause_in_save("marked", state.global_step, self.run_dir, rank=0)
            best = Path(state.best_model_checkpoint) if self.keep_best and state.best_model_checkpoint else None
            if best is not None:  # output.keep_best: the trainer tracks it by args.metric_for_best_model
                note = {"checkpoint": str(best), "metric": args.metric_for_best_model, "value": state.best_metric}
                staging = self.run_dir / f"{BEST_FILE}.tmp"
                staging.write_text(json.dumps(note) + "\n")
                staging.replace(self.run_dir / BEST_FILE)
            retire_old_checkpoints(self.run_dir, self.keep_last, best)


class Heartbeat(TrainerCallback):
    """Each rank notes the step it began and the step it finished, so a timed-out collective can name who lagged.

    Put it last among the callbacks: "finished" then means past every collective of the step.
    """

    def __init__(self, run_dir: Path, rank: int):
        self.run_dir, self.rank = Path(run_dir), rank

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw) -> None:
        note_heartbeat(self.run_dir, f"rank-{self.rank}", state.global_step + 1, "began")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw) -> None:
        note_heartbeat(self.run_dir, f"rank-{self.rank}", state.global_step, "finished")
        step_end_faults(state.global_step, self.rank)


class PreemptionCallback(TrainerCallback):
    """Checkpoints and stops training on all ranks after the step in which a stop was requested."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.stopped = False

    def _requested_anywhere(self) -> bool:
        """True when any rank saw the request; every rank must call this at the same step (a collective)."""
        import torch
        import torch.distributed as dist

        seen = (self.run_dir / REQUEST_FILE).exists()
        if not (dist.is_available() and dist.is_initialized()):
            return seen
        # the file reaches the ranks' filesystems at different moments: agree, or ranks would part ways
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if seen else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw) -> None:
        if self.stopped or state.global_step >= state.max_steps or not self._requested_anywhere():
            return
        self.stopped = True
        control.should_save = True
        control.should_training_stop = True
        log.warning("preemption requested: saving a checkpoint at step %d and stopping", state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw) -> None:
        if self.stopped and state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            record = {"step": state.global_step, "max_steps": state.max_steps, "checkpoint": str(checkpoint)}
            (self.run_dir / RECORD_FILE).write_text(json.dumps(record))


class TrackingCallback(TrainerCallback):
    """Rank 0 feeds its new metrics.jsonl records to the trackers (TensorBoard, W&B, MLflow)."""

    def __init__(self, report_to: list[str], run_dir: Path, rank: int):
        self.trackers = Trackers(report_to, run_dir) if rank == 0 else None
        self.tail = MetricsTail(Path(run_dir) / "metrics.jsonl")

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw) -> None:
        if self.trackers is not None and not self.trackers.callbacks:
            self.trackers.start()

    def _forward(self) -> None:
        """Hand rank 0's new records to the trackers."""
        if self.trackers is not None:
            for record in self.tail.new_records():
                self.trackers.log(record)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw) -> None:
        if logs and "loss" in logs:
            self._forward()

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics=None, **kw
    ) -> None:
        if metrics and "eval_loss" in metrics:
            self._forward()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw) -> None:
        self._forward()

    def close(self, failed: bool = False) -> None:
        """Close the trackers' runs: after the last evaluation, which may come after training ends."""
        if self.trackers is not None:
            self.trackers.finish(failed)


def close_trackers(trainer, failed: bool = False) -> None:
    """Close the runs of the trainer's TrackingCallback, if it has one; `failed` marks them so.

    A tracker that cannot close is logged, never raised: on a failed run it would hide the real error.
    """
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TrackingCallback):
            try:
                callback.close(failed)
            except Exception as exc:  # a tracker's own failure must not mask the run's
                log.warning("closing the experiment trackers failed: %s", exc)
