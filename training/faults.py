"""Fault injection for the reliability tests, switched on by `TUNEYARD_FAULT_*` environment variables.

Nothing here acts unless a test sets one of the variables. The driver forwards them to its Ray
workers (`forwarded_faults` -> payload -> `apply_faults`), so a test sets them where it runs
`tuneyard train`.

- `TUNEYARD_FAULT_NAN_LOSS="3,4"`: rank 0's training loss becomes NaN at those steps (1-based, as
  logged; for PPO the policy's optimizer steps), so the other ranks learn of it only through the
  all-reduce that decides a skip.
- `TUNEYARD_FAULT_PAUSE="written@20"`: rank 0 stops inside the save of checkpoint-20 at that point
  (see `SAVE_POINTS`) and sleeps until it is killed; once per run directory, so the restarted run passes.
- `TUNEYARD_FAULT_HOLD="1@3"`: rank 1 sleeps for a long time after step 3 (its peers' next collective
  times out; for PPO the policy's rank 1 after its optimizer step 3, and the controller stops waiting).
- `TUNEYARD_FAULT_ENGINE_HOLD="0@2"`: PPO's rollout engine 0 sleeps for a long time instead of receiving the
  weights of its second sync (the policy's broadcast times out, naming the parameter; the controller names the engine).
- `TUNEYARD_FAULT_RAISE="3"`: every rank raises ValueError("injected") after step 3 (for PPO the policy's
  ranks after their optimizer step 3): an error of the training code itself, the same on every attempt.
- `TUNEYARD_FAULT_PARK="generating@2"`: the driver stops when it enters that phase (`driver_phase`) for the Nth
  time (1 without @N), writes RUN_DIR/faults/parked-PHASE and sleeps until a signal ends it: a test interrupts a
  phase on purpose instead of racing the clock.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

PREFIX = "TUNEYARD_FAULT_"
SAVE_POINTS = ("weights", "written", "marked")  # model written | all ranks' files written | marked complete
HOLD_SECONDS = 3600.0


def forwarded_faults() -> dict[str, str]:
    """The fault variables set in this (driver) process, to hand to the workers."""
    return {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}


def apply_faults(faults: dict[str, str]) -> None:
    """In a worker: switch on the faults the driver forwarded."""
    os.environ.update({k: v for k, v in faults.items() if k.startswith(PREFIX)})


def nan_loss_steps() -> set[int]:
    """Steps whose loss rank 0 turns into NaN (empty unless TUNEYARD_FAULT_NAN_LOSS is set)."""
    value = os.environ.get(PREFIX + "NAN_LOSS", "")
    return {int(step) for step in value.split(",") if step.strip()}


def pause_in_save(point: str, step: int, run_dir: Path, rank: int) -> None:
    """Sleep until killed at `point` of the save of checkpoint-`step`, when TUNEYARD_FAULT_PAUSE names it."""
    if rank != 0 or os.environ.get(PREFIX + "PAUSE") != f"{point}@{step}":
        return
    marker = Path(run_dir) / "faults" / f"paused-{point}-{step}"
    if marker.exists():
        return
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(str(os.getpid()))  # the test reads whom to kill
    while True:
        time.sleep(1)


def step_end_faults(step: int, rank: int) -> None:
    """The faults of a rank's step end: a hold (TUNEYARD_FAULT_HOLD="RANK@STEP") or an error (`raise_at_step`)."""
    # every rank calls this after each step (SPMD trainers and PPO's policy)
    raise_at_step(step)
    if os.environ.get(PREFIX + "HOLD") == f"{rank}@{step}":
        time.sleep(HOLD_SECONDS)


def raise_at_step(step: int) -> None:
    """Raise ValueError("injected") after `step` on every rank, when TUNEYARD_FAULT_RAISE names that step."""
    if str(step) in os.environ.get(PREFIX + "RAISE", "").replace(" ", "").split(","):
        raise ValueError(f"injected at step {step}")


def engine_sync_faults(sync: int, rank: int) -> None:
    """A rollout engine's hold before it receives the weights of its sync number `sync` (TUNEYARD_FAULT_ENGINE_HOLD)."""
    if os.environ.get(PREFIX + "ENGINE_HOLD") == f"{rank}@{sync}":
        time.sleep(HOLD_SECONDS)


def parked_name(phase: str) -> str:
    """The phase as a file name: RUN_DIR/faults/parked-NAME says the driver is parked there."""
    return re.sub(r"[^a-z0-9]+", "-", phase.lower()).strip("-")


def park_at(phase: str, times: int, run_dir: Path) -> None:
    """Sleep until a signal ends the driver, when TUNEYARD_FAULT_PARK names `phase` entered for the `times`-th time."""
    name, _, nth = os.environ.get(PREFIX + "PARK", "").partition("@")
    if name != phase or times != int(nth or 1):
        return
    marker = Path(run_dir) / "faults" / f"parked-{parked_name(phase)}"
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(str(os.getpid()))
    while True:
        time.sleep(0.1)  # short sleeps: the signal's handler runs between them
