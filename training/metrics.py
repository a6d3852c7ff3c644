"""metrics.jsonl: one JSON object per logged step or evaluation, written by rank 0; and its plot."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

COMPLETE_MARKER = "tuneyard-complete"


def append_metrics(path: Path, record: dict) -> None:
    """Append one record and flush, so followers see it at once."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics.jsonl (a torn last line is skipped)."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


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


# each stage's own figures, drawn in a panel of their own when any plotted run logged them (eval_ too)
STAGE_FIGURES = (
    ("reward", "mean reward (GRPO, PPO)"),
    ("kl", "KL to reference (GRPO, PPO, KTO)"),
    ("rewards/margins", "reward margin (DPO, KTO)"),
    ("rewards/accuracies", "reward accuracy (DPO)"),
    ("margin", "reward margin (reward model)"),
    ("accuracy", "pair accuracy (reward model)"),
)


def figure_panels(runs: list[list[dict]]) -> list[tuple[str, str]]:
    """(key, title) of each panel to draw for runs' records: loss, then the stage figures any run logged."""
    present = [
        (key, title)
        for key, title in STAGE_FIGURES
        if any(key in r or f"eval_{key}" in r for records in runs for r in records)
    ]
    return [("loss", "loss"), *present]


def plot_metrics(metrics_path: Path, png_path: Path) -> Path:
    """Draw one run's metrics.jsonl into a PNG (see `plot_runs`)."""
    return plot_runs([(Path(metrics_path).parent.name, Path(metrics_path))], png_path)


def plot_runs(runs: list[tuple[str, Path]], png_path: Path) -> Path:
    """Overlay runs' (label, metrics.jsonl): train and eval loss, then a panel per stage figure any run logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = [(label, read_metrics(path)) for label, path in runs]
    panels = figure_panels([records for _, records in loaded])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 1, 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for i, (label, records) in enumerate(loaded):
            color = colors[i % len(colors)]
            train = [(r["step"], r[key]) for r in records if key in r and "step" in r]
            evals = [(r["step"], r[f"eval_{key}"]) for r in records if f"eval_{key}" in r and "step" in r]
            if train:
                ax.plot(*zip(*train, strict=True), color=color, linewidth=1, label=f"{label}")
            if evals:
                ax.plot(*zip(*evals, strict=True), "o--", color=color, label=f"{label} (eval)")
        ax.set_xlabel("step")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)
