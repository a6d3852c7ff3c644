"""metrics.jsonl: one JSON object per logged step or evaluation, written by rank 0; and its plot.

No transformers import here: the driver reads and writes metrics.jsonl, and importing the Trainer's modules
(peft, bitsandbytes with them) would add seconds to every `tuneyard` command. The writer is `metrics_callback`.
"""

from __future__ import annotations

import json
from pathlib import Path

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


# each stage's own figures, drawn in a panel of their own when any plotted run logged them (eval_ too)
STAGE_FIGURES = (
    ("reward", "mean reward (GRPO, RLOO, PPO)"),
    ("kl", "KL to reference (GRPO, RLOO, PPO, KTO)"),
    ("rewards/margins", "reward margin (DPO, KTO)"),
    ("rewards/accuracies", "reward accuracy (DPO)"),
    ("margin", "reward margin (reward model)"),
    ("accuracy", "pair accuracy (reward model)"),
    ("turns", "assistant turns per episode (multi-turn RL)"),
    ("tool_errors", "tool errors per iteration (tools environment)"),
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
