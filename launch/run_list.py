"""`tuneyard runs`: one row per run directory, read from its job.yaml, outcome.json and metrics.jsonl."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tuneyard.training.errors import UserError
from tuneyard.training.metrics import read_metrics
from tuneyard.training.run_dir import RUN_FILE, read_outcome


@dataclass
class RunRow:
    """What `tuneyard runs` shows of one run directory."""

    path: Path
    stage: str
    status: str
    step: int | None
    total: int | None
    loss: float | None
    figure: str  # "eval loss 6.26 -> 1.24" or the stage's first before/after figure
    started: float | None
    seconds: float | None
    final: Path | None


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories (they hold run.json) at `root` and up to two levels below it."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; give the folder that holds your run directories (default runs/)")
    found = [root] if (root / RUN_FILE).exists() else []
    for pattern in (f"*/{RUN_FILE}", f"*/*/{RUN_FILE}"):
        found += [p.parent for p in root.glob(pattern)]
    return sorted(set(found))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def run_status(run_dir: Path, outcome: dict) -> str:
    """running, finished, preempted, interrupted, failed; `died` for a driver gone without a word; `unknown`."""
    status = outcome.get("status")
    if status == "running":
        if outcome.get("host") == socket.gethostname() and not _alive(int(outcome.get("pid", 0))):
            return "died"  # killed (SIGKILL, OOM, a lost node) before it could say so
        return "running"
    if status:
        return status
    return "finished" if (run_dir / "final").is_dir() else "unknown"  # a run from before outcome.json


def _figure(outcome: dict, records: list[dict]) -> str:
    figures = outcome.get("figures") or {}
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    if not figures and len(evals) >= 1:
        figures = {"eval loss": (evals[0], evals[-1])}
    for name, (before, after) in figures.items():
        if "acc" in name or name == "greedy = chosen":
            return f"{name} {before:.0%} -> {after:.0%}"
        return f"{name} {before:.3g} -> {after:.3g}"
    return ""


def read_run(run_dir: Path, now: float | None = None) -> RunRow:
    """One run directory's row."""
    now = time.time() if now is None else now
    outcome = read_outcome(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    try:
        stage = (yaml.safe_load((run_dir / "job.yaml").read_text()) or {}).get("stage", "?")
    except (OSError, yaml.YAMLError, AttributeError):
        stage = "?"
    starts = [r for r in records if r.get("event") == "start"]
    steps = [r for r in records if "loss" in r and "step" in r]
    started = outcome.get("started") or (starts[0]["time"] if starts else None)
    status = run_status(run_dir, outcome)
    seconds = outcome.get("seconds")
    if seconds is None and status == "running" and started:
        seconds = now - started
    return RunRow(
        path=run_dir,
        stage=str(stage),
        status=status,
        step=steps[-1]["step"] if steps else None,
        total=starts[-1].get("total_steps") if starts else None,
        loss=steps[-1]["loss"] if steps else None,
        figure=_figure(outcome, records),
        started=started,
        seconds=seconds,
        final=run_dir / "final" if (run_dir / "final").is_dir() else None,
    )


def _wall(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def format_runs(rows: list[RunRow], root: Path) -> str:
    """The table `tuneyard runs` prints: a header and a row per run, oldest start first."""
    header = ("RUN", "STAGE", "STATUS", "STEP", "LOSS", "BEFORE -> AFTER", "STARTED", "WALL", "FINAL")
    table = [header]
    for row in sorted(rows, key=lambda r: r.started or 0):
        name = str(row.path.relative_to(root)) if row.path != root else row.path.name
        table.append(
            (
                name,
                row.stage,
                row.status,
                f"{row.step if row.step is not None else '-'}/{row.total or '?'}",
                f"{row.loss:.4g}" if row.loss is not None else "-",
                row.figure or "-",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(row.started)) if row.started else "-",
                _wall(row.seconds),
                str(row.final) if row.final else "-",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table)


def list_runs(root: Path) -> str:
    """The `tuneyard runs` table of the run directories under `root`."""
    root = Path(root)
    found = find_run_dirs(root)
    if not found:
        return f"no run directories under {root} (a run directory holds {RUN_FILE})"
    return format_runs([read_run(d) for d in found], root)
