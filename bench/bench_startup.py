"""Start-up: time to the first training step of `sft-tiny`, this tree against the main issue 12 measured.

Each run is a fresh `tuneyard train` process, as a user types it: it starts its own local Ray (the
benchmark's Ray is not shared), on a warm machine (DeepSpeed's CPU op built, the tokenised data cached,
both trees run once untimed first). The trees alternate, three rounds each; the ratio is the medians'.
Time to first step runs from the process's start to the first loss in metrics.jsonl. This tree's phases
come from RUN_DIR/logs/status.jsonl (each status lasts until the next; the last until the first loss).

"Before" is 4f85327: the main issue 12 was measured on, with that session's Ray Train report fix (without
it every logged step waited up to 2 s for Ray, which would flatter the comparison). A second check
times `tuneyard runs` over the benchmark's run folders: the driver's imports, nearly all of it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tuneyard.launch.config import load_job
from tuneyard.launch.run_job import run_job
from tuneyard.training.metrics import read_metrics
from tuneyard.training.run_dir import read_outcome, status_history

from bench.common import ROOT

BEFORE_COMMIT = "4f85327"
ROUNDS = 3


def phases(run_dir: Path) -> tuple[list[tuple[str, float]], float]:
    """(status, seconds) in order, and the seconds from the run's start to its first logged loss."""
    started = read_outcome(run_dir)["started"]
    first_loss = next(r["time"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r)
    history = [h for h in status_history(run_dir) if h["time"] < first_loss]  # start-up's, not later ones
    ends = [h["time"] for h in history[1:]] + [first_loss]
    rows = [("before the first status (checks, figures)", history[0]["time"] - started)]
    rows += [(h["status"], end - h["time"]) for h, end in zip(history, ends, strict=True)]
    return rows, first_loss - started


def cli(tree: Path, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    """Run `tuneyard ARGS` from `tree`'s code in a fresh process; its wall-clock start and the result."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's
    env["PYTHONPATH"] = str(tree)
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "tuneyard.launch.cli", *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"tuneyard {' '.join(args)} in {tree} failed:\n{done.stderr[-3000:]}")
    return started, done


def first_step(tree: Path, model: Path, run_dir: Path, cache: Path) -> float:
    """Seconds from a fresh `tuneyard train sft-tiny` process's start to its first logged loss."""
    job = tree / "examples" / "configs" / "sft-tiny.yaml"
    overrides = [f"model.name_or_path={model}", f"output.dir={run_dir}", f"data.cache_dir={cache}"]
    started, _ = cli(tree, "train", str(job), *overrides, "training.max_steps=3")
    return next(r["time"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r) - started


def runs_seconds(tree: Path, root: Path) -> float:
    """Wall-clock seconds of `tuneyard runs ROOT` (a table read from the run folders' files)."""
    started, _ = cli(tree, "runs", str(root))
    return time.time() - started


def main(work: Path) -> dict:
    """Median time to first step before and after, three alternating rounds; this tree's phases."""
    work.mkdir(parents=True, exist_ok=True)
    before = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), BEFORE_COMMIT], check=True)
    try:
        pre = work / "pretrain"
        run_job(
            load_job(
                ROOT / "examples" / "configs" / "pretrain-tiny.yaml",
                [f"output.dir={pre}", f"data.cache_dir={work / '.tok'}", "training.max_steps=3"],
            ),
            show_progress=False,
        )
        trees = {"before": before, "after": ROOT}
        times: dict[str, list[float]] = {name: [] for name in trees}
        listing: dict[str, list[float]] = {name: [] for name in trees}
        for name, tree in trees.items():  # untimed: each tree's tokenised cache (their layouts differ)
            first_step(tree, pre / "final", work / f"{name}-warm-up", work / f".tok-{name}")
        for round_ in range(ROUNDS):
            for name, tree in trees.items():
                run_dir = work / f"{name}-{round_}"
                times[name].append(first_step(tree, pre / "final", run_dir, work / f".tok-{name}"))
                listing[name].append(runs_seconds(tree, work))
        rows, _ = phases(work / f"after-{ROUNDS - 1}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    median = {name: statistics.median(values) for name, values in times.items()}
    listing_median = {name: statistics.median(values) for name, values in listing.items()}
    slowest = sorted(rows, key=lambda row: -row[1])[:3]
    return {
        "time_to_first_step_s": {name: [round(t, 2) for t in values] for name, values in times.items()},
        "phases_s": {status: round(s, 2) for status, s in rows},
        "ratio": median["after"] / median["before"],
        "target": "<= 0.5",
        "note": f"sft-tiny, fresh `tuneyard train`: {median['after']:.1f} s vs {median['before']:.1f} s "
        f"({BEFORE_COMMIT}); slowest phases now: " + ", ".join(f"{status} {s:.1f} s" for status, s in slowest),
        "checks": [
            {
                "name": "tuneyard runs, after / before",
                "ratio": listing_median["after"] / listing_median["before"],
                "target": "< 1",
                "note": f"{listing_median['after']:.1f} s vs {listing_median['before']:.1f} s",
                "seconds": {name: [round(t, 2) for t in values] for name, values in listing.items()},
            }
        ],
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=2))
