"""Start-up: where the seconds before the first training step go, for the demo's pretraining job (2 workers, ZeRO-3).

Each status a run says (RUN_DIR/logs/status.jsonl) lasts until the next one; the last lasts until the first
logged loss. One run with a cold tokenisation cache, one warm, on the benchmark's already running Ray (so
"starting Ray" is only connecting; a fresh `tuneyard train` adds Ray's own start, about 4 s on 2 cores).
The ratio compares the warm time to first step with the 70 s issue 12 measured for `make demo`'s
pretraining before this work: that baseline was not measured side by side, so read it as a rough guide.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import ROOT
from launch.config import load_job
from launch.run import run_job
from training.metrics import read_metrics
from training.run_dir import read_outcome, status_history

ISSUE_BASELINE_S = 70.0


def phases(run_dir: Path) -> tuple[list[tuple[str, float]], float]:
    """(status, seconds) in order, and the seconds from the run's start to its first logged loss."""
    started = read_outcome(run_dir)["started"]
    first_loss = next(r["time"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r)
    history = [h for h in status_history(run_dir) if h["time"] < first_loss]  # start-up's, not later ones
    ends = [h["time"] for h in history[1:]] + [first_loss]
    rows = [("before the first status (checks, figures)", history[0]["time"] - started)]
    rows += [(h["status"], end - h["time"]) for h, end in zip(history, ends, strict=True)]
    return rows, first_loss - started


def main(work: Path) -> dict:
    """Time to first step, cold and warm, with each phase's seconds."""
    result: dict = {}
    for name in ("cold", "warm"):  # the same cache folder: the second run finds the first one's tokens
        run_dir = work / name
        overrides = [f"output.dir={run_dir}", f"data.cache_dir={work / '.tok'}", "training.max_steps=3"]
        run_job(load_job(ROOT / "examples" / "configs" / "pretrain-tiny.yaml", overrides), show_progress=False)
        rows, total = phases(run_dir)
        result[name] = {"time_to_first_step_s": total, "phases_s": {status: round(s, 2) for status, s in rows}}
    slowest = sorted(result["warm"]["phases_s"].items(), key=lambda kv: -kv[1])[:3]
    return {
        **result,
        "ratio": result["warm"]["time_to_first_step_s"] / ISSUE_BASELINE_S,
        "target": "<= 0.5 (vs 70 s in issue 12, not side by side)",
        "note": "warm: " + ", ".join(f"{status} {s:.1f} s" for status, s in slowest),
    }
