"""The console's live progress line, drawn from the run's metrics.jsonl while workers train."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from tuneyard.training.metrics import read_metrics
from tuneyard.training.run_dir import read_status


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def progress_line(records: list[dict], started: float, now: float, status: str = "") -> str:
    """`step 40/200 [20%] loss 2.31 | 5,120 tok/s | elapsed 0:12 | ETA 0:48` from the records so far.

    Before the first step it says what the run is busy with (`status`: the run directory's status line).
    """
    starts = [r for r in records if r.get("event") == "start"]
    steps = [r for r in records if "loss" in r]
    if not starts:
        return f"starting workers: {status or 'starting'} ... {_clock(now - started)}"
    total = starts[-1].get("total_steps") or 0
    first_step = starts[-1].get("step", 0)
    # a lost worker restarts the run from its newest checkpoint: another start record
    restarted = f" | restarted from step {first_step} after a lost worker" if len(starts) > 1 else ""
    if not steps:
        return f"step {first_step}/{total} | compiling and loading ...{restarted} {_clock(now - started)}"
    last = steps[-1]
    done = last["step"] - first_step
    span = last["time"] - starts[-1]["time"]
    eta = span / done * (total - last["step"]) if done > 0 else 0.0
    evals = [r for r in records if "eval_loss" in r]
    parts = [
        f"step {last['step']}/{total} [{100 * last['step'] / max(total, 1):3.0f}%]",
        f"loss {last['loss']:.3f}",
        *([f"eval {evals[-1]['eval_loss']:.3f}"] if evals else []),
        # PPO's iteration figures: what it is optimising and how far it strayed from the reference (KTO logs a kl
        # without a reward)
        *([f"reward {last['reward']:.3f}", f"kl {last['kl']:.3f}"] if "kl" in last and "reward" in last else []),
        f"{last['tokens_per_s']:,.0f} tok/s"
        if "tokens_per_s" in last
        else f"{last.get('samples_per_s', 0):,.1f} samples/s",
        f"elapsed {_clock(now - started)}",
        f"ETA {_clock(eta)}",
    ]
    if restarted:
        parts.append(restarted.removeprefix(" | "))
    skipped = sum(1 for r in records if r.get("event") == "nonfinite")
    if skipped:
        parts.append(f"{skipped} NaN/inf step{'s' if skipped > 1 else ''} skipped")
    return " | ".join(parts)


class ProgressFollower:
    """Redraws one line (a TTY) or prints a line every `every` seconds (a log) until stopped."""

    def __init__(self, metrics_path: Path, label: str, every: float = 10.0):
        self.metrics_path, self.label, self.every = Path(metrics_path), label, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tty = sys.stdout.isatty()
        self._offset = len(read_metrics(self.metrics_path))  # records of earlier attempts are not ours
        self._last_line = ""

    def __enter__(self) -> ProgressFollower:
        self._started = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._draw(final=True)

    def _draw(self, final: bool = False) -> None:
        line = f"[{self.label}] " + progress_line(
            read_metrics(self.metrics_path)[self._offset :],
            self._started,
            time.time(),
            read_status(self.metrics_path.parent),
        )
        if self._tty:
            sys.stdout.write("\r\033[K" + line + ("\n" if final else ""))
        elif line != self._last_line or not final:
            sys.stdout.write(line + "\n")
        self._last_line = line
        sys.stdout.flush()

    def _run(self) -> None:
        interval = 0.5 if self._tty else self.every
        while not self._stop.wait(interval):
            self._draw()
