"""Stopping at a checkpoint when the scheduler warns that the job is about to lose its nodes.

The path of a warning: SLURM (`--signal=B:USR1@SECS`) or a user signals the driver, `tuneyard
train`. The driver does not talk to the workers directly: it writes `RUN_DIR/preempt-request`.
Every worker's `PreemptionCallback` looks for that file after each optimizer step; the ranks
agree (an all-reduce of one flag, so all of them stop after the same step), then the HF trainer
saves a checkpoint and leaves its loop, and the worker skips `final/`. Rank 0 records the
checkpoint in `RUN_DIR/preempted`; the driver turns that record into `Preempted`, which the CLI
reports and exits with `PREEMPTED_EXIT_CODE`. Running the job again (a SLURM requeue) resumes
from that checkpoint through `output.resume: auto`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

REQUEST_FILE = "preempt-request"
RECORD_FILE = "preempted"
# EX_TEMPFAIL from sysexits.h: "temporary failure, try again later" - the job is worth rerunning
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Training stopped early at a checkpoint because a preemption warning arrived."""

    exit_code = PREEMPTED_EXIT_CODE  # the CLI exits with it


def request_stop(run_dir: Path, reason: str) -> None:
    """Ask the workers of the run in `run_dir` to checkpoint and stop after their current step."""
    (Path(run_dir) / REQUEST_FILE).write_text(reason + "\n")


@contextlib.contextmanager
def preemption_watch(run_dir: Path) -> Iterator[None]:
    """While the block runs, SIGUSR1/SIGTERM ask the workers to checkpoint and stop; after it, raise `Preempted`.

    A second SIGTERM is not caught again: it ends the driver as usual. Outside the main thread
    (no signal handlers there) the block still turns a stop into `Preempted`.
    """
    run_dir = Path(run_dir)
    for name in (REQUEST_FILE, RECORD_FILE):  # left over from the attempt that was preempted
        (run_dir / name).unlink(missing_ok=True)
    previous: dict[int, object] = {}

    def on_signal(signum: int, frame: object) -> None:
        request_stop(run_dir, signal.Signals(signum).name)
        if signum == signal.SIGTERM and signum in previous:
            handler = previous.pop(signum)
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)  # type: ignore[arg-type]

    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            previous[signum] = signal.signal(signum, on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)  # type: ignore[arg-type]
    record = run_dir / RECORD_FILE
    if record.exists():
        info = json.loads(record.read_text())
        raise Preempted(
            f"preempted: training stopped after step {info['step']} of {info['max_steps']} with a checkpoint in "
            f"{info['checkpoint']}; run the same job again (output.resume: auto) to continue from it"
        )
