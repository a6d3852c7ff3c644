"""How the driver answers an interrupt, whatever phase the run is in.

SIGINT (Ctrl-C, or `kill -INT`) raises KeyboardInterrupt in the driver's main thread, also where the parent started
it with SIGINT ignored (a non-interactive shell's `tuneyard train ... &` does that, and Python then keeps ignoring
it). SIGTERM raises `Terminated`, a KeyboardInterrupt as well, except while the workers train: there it is a
preemption warning (`tuneyard.training.preemption`: checkpoint, then stop). Either unwinds the driver through the
blocks that end the workers, the role actors and Ray; the CLI then names the phase it interrupted (`driver_phase`)
and exits 130 (143 after SIGTERM). A checkpoint being saved is never marked complete, so the newest complete
checkpoint stays the one a rerun resumes from.
"""

from __future__ import annotations

import signal
import threading
from collections import Counter
from pathlib import Path

from tuneyard.training.faults import park_at

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a command Ctrl-C ended
TERMINATED_EXIT_CODE = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM ended the run (outside the workers' training, where it asks for a checkpoint first)."""

    exit_code = TERMINATED_EXIT_CODE


def raise_terminated(signum: int, frame: object) -> None:
    """The driver's SIGTERM handler."""
    raise Terminated()


def answer_interrupts() -> None:
    """From the main thread: SIGINT raises KeyboardInterrupt and SIGTERM `Terminated`, whatever the parent set."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_terminated)


_now: dict = {"phase": "starting", "detail": "", "run_dir": None}
_entered: Counter[str] = Counter()


def driver_phase(phase: str, run_dir: Path | None = None, detail: str = "") -> None:
    """Note the phase the driver enters (an interrupt names it, with `detail` such as the iteration); a test's
    TUNEYARD_FAULT_PARK may stop the driver here."""
    _now.update(phase=phase, detail=detail, run_dir=run_dir)
    _entered[phase] += 1
    if run_dir is not None:
        park_at(phase, _entered[phase], run_dir)


def current_phase() -> str:
    """What the driver was doing, for the interrupt's message: the phase, and its detail or the last logged step."""
    detail = _now["detail"] or last_step(_now["run_dir"])
    return f"{_now['phase']} ({detail})" if detail else _now["phase"]


def last_step(run_dir: Path | None) -> str:
    """'after step N' for the last training step the run logged, or '' (none, or no run yet)."""
    from tuneyard.training.metrics import read_metrics

    if run_dir is None or not (Path(run_dir) / "metrics.jsonl").exists():
        return ""
    steps = [r["step"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r and "step" in r]
    return f"after step {steps[-1]}" if steps else ""
