"""Start-up: time to the first training step of `sft-tiny`, for this tree alone or side by side with a base ref.

    python bench/bench_startup.py                     # this tree: time to first step and where it goes
    python bench/bench_startup.py --base REF [WORK]   # this tree against git REF, alternating

Each run is a fresh `tuneyard train` process, as a user types it: it starts its own local Ray (the benchmark's
Ray is not shared), on a warm machine (DeepSpeed's CPU op built, the tokenised data cached, each tree run once
untimed first). Time to first step runs from the process's start to the first loss in metrics.jsonl; the result
is the median of `--rounds` runs. This tree's phases come from RUN_DIR/logs/status.jsonl (each status lasts
until the next; the last until the first loss). A second check times `tuneyard runs` over the benchmark's run
folders: the driver's imports, nearly all of it.

With `--base REF`, REF is checked out in a git worktree under WORK and the two trees alternate round by round,
so both see the same machine load; the ratio is this tree's median over the base's. Each tree runs its own code:
the command's module comes from the tree's pyproject.toml (`launch.cli` in the older layout with top-level
packages, `tuneyard.launch.cli` in this one), and a `tuneyard.*` tree is put on the import path through a small
folder of links that follows its package-dir mapping, so the installed editable copy is not what runs. Both trees
run in this venv: a base whose dependencies differ (e.g. one that still needs Ray Train, `ray[train]`) needs them
installed here.

Without `--base` there is nothing to divide by: the ratio is NaN (`not measured` in bench/results/summary.md)
and the seconds and phases are the result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 3
THIS = "this tree"


def phases(run_dir: Path) -> tuple[list[tuple[str, float]], float]:
    """(status, seconds) in order, and the seconds from the run's start to its first logged loss (this tree's runs)."""
    from tuneyard.training.metrics import read_metrics
    from tuneyard.training.run_dir import read_outcome, status_history

    started = read_outcome(run_dir)["started"]
    first_loss = next(r["time"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r)
    history = [h for h in status_history(run_dir) if h["time"] < first_loss]  # start-up's, not later ones
    ends = [h["time"] for h in history[1:]] + [first_loss]
    rows = [("before the first status (checks, figures)", history[0]["time"] - started)]
    rows += [(h["status"], end - h["time"]) for h, end in zip(history, ends, strict=True)]
    return rows, first_loss - started


class Tree:
    """A source tree of tuneyard and how to run its `tuneyard` command: the CLI module and the import path."""

    def __init__(self, name: str, root: Path, links: Path):
        self.name, self.root = name, root
        pyproject = tomllib.loads((root / "pyproject.toml").read_text())
        entry = pyproject.get("project", {}).get("scripts", {}).get("tuneyard", "")
        self.module = entry.partition(":")[0]
        if not self.module:
            raise SystemExit(f"{root}/pyproject.toml has no `tuneyard` console script; is {root} a tuneyard tree?")
        if self.module.startswith("tuneyard."):
            # the folders install as tuneyard.* through package-dir: mirror that with links, as the editable install
            # does for this checkout, so that `tuneyard.*` imports this tree's code (in the workers too)
            package_dir = pyproject.get("tool", {}).get("setuptools", {}).get("package-dir", {})
            package = links / "tuneyard"
            package.mkdir(parents=True, exist_ok=True)
            (package / "__init__.py").touch()
            for dotted, folder in package_dir.items():
                prefix, _, sub = dotted.partition(".")
                if prefix == "tuneyard" and sub and "." not in sub and not (package / sub).exists():
                    (package / sub).symlink_to(root / folder, target_is_directory=True)
            self.import_path = str(links)
        else:  # the older layout: cluster/, training/, rlhf/ and launch/ import as top-level packages
            self.import_path = str(root)

    def cli(self, *args: str) -> float:
        """Run `tuneyard ARGS` from this tree's code in a fresh process; its wall-clock start."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's
        env["PYTHONPATH"] = self.import_path  # inherited by the local Ray, so by the workers too
        started = time.time()
        done = subprocess.run(
            [sys.executable, "-m", self.module, *args],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"tuneyard {' '.join(args)} in {self.root} failed:\n{done.stderr[-3000:]}")
        return started

    def first_step(self, model: Path, run_dir: Path, cache: Path) -> float:
        """Seconds from a fresh `tuneyard train sft-tiny` process's start to its first logged loss."""
        from tuneyard.training.metrics import read_metrics

        job = self.root / "examples" / "configs" / "sft-tiny.yaml"
        if not job.is_file():
            raise SystemExit(f"{self.name} ({self.root}) has no examples/configs/sft-tiny.yaml to time")
        overrides = [f"model.name_or_path={model}", f"output.dir={run_dir}", f"data.cache_dir={cache}"]
        started = self.cli("train", str(job), *overrides, "training.max_steps=3")
        return next(r["time"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r) - started

    def runs_seconds(self, folder: Path) -> float:
        """Wall-clock seconds of `tuneyard runs FOLDER` (a table read from the run folders' files)."""
        started = self.cli("runs", str(folder))
        return time.time() - started


def pretrained(work: Path) -> Path:
    """The model both trees fine-tune: 3 steps of this tree's pretrain-tiny, in this process."""
    from tuneyard.launch.config import load_job
    from tuneyard.launch.run_job import run_job

    pre = work / "pretrain"
    overrides = [f"output.dir={pre}", f"data.cache_dir={work / '.tok'}", "training.max_steps=3"]
    run_job(load_job(ROOT / "examples" / "configs" / "pretrain-tiny.yaml", overrides), show_progress=False)
    return pre / "final"


def measure(work: Path, trees: list[Tree], rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per tree: seconds to the first step and of `tuneyard runs`, `rounds` times each, the trees alternating."""
    model = pretrained(work)
    times: dict[str, list[float]] = {tree.name: [] for tree in trees}
    listing: dict[str, list[float]] = {tree.name: [] for tree in trees}
    for i, tree in enumerate(trees):  # untimed: each tree's tokenised cache (their layouts may differ)
        tree.first_step(model, work / f"tree{i}-warm-up", work / f".tok-tree{i}")
    for round_ in range(rounds):
        for i, tree in enumerate(trees):
            times[tree.name].append(tree.first_step(model, work / f"tree{i}-{round_}", work / f".tok-tree{i}"))
            listing[tree.name].append(tree.runs_seconds(work))
    return times, listing


def main(work: Path, base: str | None = None, rounds: int = ROUNDS) -> dict:
    """Time to first step of this tree (median of `rounds`) and its phases; with `base`, also the base's, alternating.

    `bench/run_all.py startup` calls it as main(WORK): this tree alone.
    """
    work.mkdir(parents=True, exist_ok=True)
    this = Tree(THIS, ROOT, work / "import-this")
    if base is None:
        times, listing = measure(work, [this], rounds)
        rows, _ = phases(work / f"tree0-{rounds - 1}")
        return result(times, listing, rows, None)
    checkout = work / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(checkout), base], check=True)
    try:
        times, listing = measure(work, [Tree(base, checkout, work / "import-base"), this], rounds)
        rows, _ = phases(work / f"tree1-{rounds - 1}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(checkout)], check=False)
    return result(times, listing, rows, base)


def result(times: dict, listing: dict, rows: list[tuple[str, float]], base: str | None) -> dict:
    """The benchmark's JSON: seconds per run, this tree's phases, and the ratios against the base (NaN without)."""
    median = {name: statistics.median(values) for name, values in times.items()}
    listing_median = {name: statistics.median(values) for name, values in listing.items()}
    slowest = ", ".join(f"{status} {s:.1f} s" for status, s in sorted(rows, key=lambda row: -row[1])[:3])
    out = {
        "time_to_first_step_s": {name: [round(t, 2) for t in values] for name, values in times.items()},
        "phases_s": {status: round(s, 2) for status, s in rows},
    }
    if base is None:
        return out | {
            "ratio": math.nan,
            "target": "<= 0.5 against a base (give --base REF)",
            "note": f"sft-tiny, fresh `tuneyard train`: {median[THIS]:.1f} s to the first step; `tuneyard runs` "
            f"{listing_median[THIS]:.1f} s; slowest phases: {slowest}",
        }
    return out | {
        "ratio": median[THIS] / median[base],
        "target": "<= 0.5",
        "note": f"sft-tiny, fresh `tuneyard train`: {median[THIS]:.1f} s vs {median[base]:.1f} s ({base}); "
        f"slowest phases now: {slowest}",
        "checks": [
            {
                "name": "tuneyard runs, this tree / base",
                "ratio": listing_median[THIS] / listing_median[base],
                "target": "< 1",
                "note": f"{listing_median[THIS]:.1f} s vs {listing_median[base]:.1f} s",
                "seconds": {name: [round(t, 2) for t in values] for name, values in listing.items()},
            }
        ],
    }


def print_report(out: dict) -> None:
    """The medians and this tree's phases as a table, then the whole result as JSON."""
    for name, values in out["time_to_first_step_s"].items():
        print(f"{name}: {statistics.median(values):.2f} s to the first step (runs: {values})")
    print("\nthis tree's start-up, phase by phase (the last run):")
    for status, seconds in out["phases_s"].items():
        print(f"  {seconds:6.2f} s  {status}")
    if not math.isnan(out["ratio"]):
        print(f"\nratio this tree / base: {out['ratio']:.2f} (target {out['target']})")
    print(json.dumps(out, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time to the first training step of a fresh `tuneyard train sft-tiny`, this tree alone (its "
        "phases from RUN_DIR/logs/status.jsonl) or side by side with a base git ref, alternating."
    )
    parser.add_argument(
        "work", nargs="?", type=Path, help="folder for the runs and the base's worktree (default: a temporary one)"
    )
    parser.add_argument(
        "--base",
        metavar="REF",
        help="a git ref of this repository to compare with (a commit, tag or branch); checked out in a worktree "
        "under WORK and run with its own code, top-level or tuneyard.* layout alike",
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"timed runs per tree (default {ROUNDS})")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


if __name__ == "__main__":
    args = parse_args()
    if args.work is not None:
        print_report(main(args.work, args.base, args.rounds))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
            print_report(main(Path(tmp), args.base, args.rounds))
