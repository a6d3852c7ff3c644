"""The run directory: who owns it, its checkpoints, and atomic publication of `final/`."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from tuneyard.training.config import OutputConfig
from tuneyard.training.errors import TrainingFailed, UserError
from tuneyard.training.faults import pause_in_save
from tuneyard.training.metrics import COMPLETE_MARKER

RUN_FILE = "run.json"
LOW_SPACE_BYTES = 64 * 2**20  # a failed write with less free than this is taken for a full disk
STATUS_FILE = "status"  # one line: what the run is doing before its first step (the progress line shows it)
STATUS_HISTORY = "logs/status.jsonl"  # each status with its time
OUTCOME_FILE = "outcome.json"  # running (with the driver's pid and host), finished, preempted, interrupted, failed
BEST_FILE = "best_checkpoint.json"  # output.keep_best: which checkpoint scored best, and its value
HEARTBEATS = "ranks"  # RUN_DIR/ranks/rank-N (PPO: ROLE-N): the step rank N last began or finished, and when


def job_identity(job_dump: dict) -> str:
    """A hash of everything that defines the run's results (not where it runs, lives or how it resumes)."""
    relevant = {k: v for k, v in job_dump.items() if k not in ("cluster", "output")}
    # how often to retry, how many NaN steps to bear, where figures are reported, and whether pickle weights
    # may load, are not what the run computes (and a rerun that raises a bound must resume, not be refused)
    if isinstance(relevant.get("training"), dict):
        tolerances = ("max_failures", "max_nonfinite_steps", "report_to")
        relevant["training"] = {k: v for k, v in relevant["training"].items() if k not in tolerances}
    if isinstance(relevant.get("model"), dict):
        relevant["model"] = {k: v for k, v in relevant["model"].items() if k != "allow_pickle"}
    relevant["output"] = {
        k: v for k, v in job_dump.get("output", {}).items() if k not in ("dir", "resume", "overwrite")
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


# how long a job trains: a rerun that changes only these extends the same run (it resumes from its newest checkpoint)
LENGTH_KEYS = (("training", "max_steps"), ("training", "epochs"), ("ppo", "iterations"), ("ppo", "epochs"))


def run_lineage(job_dump: dict) -> str:
    """`job_identity` without how long the job trains: a longer rerun of a run has its lineage."""
    dump = {k: dict(v) if isinstance(v, dict) else v for k, v in job_dump.items()}
    for section, key in LENGTH_KEYS:
        if isinstance(dump.get(section), dict):
            dump[section].pop(key, None)
    return job_identity(dump)


def finished_run(output: OutputConfig, identity: str) -> Path | None:
    """The run directory when it holds this very job's finished run (its final/ published), else None.

    A rerun of it has nothing left to train; `output.overwrite` or an explicit `output.resume` asks for more.
    """
    run_dir = Path(output.dir)
    if output.overwrite or output.resume != "auto" or not (run_dir / "final").is_dir():
        return None
    try:
        owner = json.loads((run_dir / RUN_FILE).read_text()).get("identity")
    except (OSError, ValueError, AttributeError):
        return None
    return run_dir if owner == identity and read_outcome(run_dir).get("status") == "finished" else None


def set_status(run_dir: Path, text: str) -> None:
    """Say what the run is busy with (starting Ray, loading the model, building an op), replacing the last word."""
    path = Path(run_dir) / STATUS_FILE
    staging = path.with_name(f"{STATUS_FILE}.{os.getpid()}")
    staging.write_text(text + "\n")
    staging.replace(path)  # atomic: the progress line never reads half a line
    history_path = Path(run_dir) / STATUS_HISTORY
    history_path.parent.mkdir(exist_ok=True)
    with open(history_path, "a") as history:  # one short line per append: no interleaving
        history.write(json.dumps({"time": time.time(), "status": text, "pid": os.getpid()}) + "\n")


def status_history(run_dir: Path) -> list[dict]:
    """Every status the run has said, in order, with its time: where start-up spends its seconds."""
    path = Path(run_dir) / STATUS_HISTORY
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_outcome(run_dir: Path, status: str, **facts: object) -> None:
    """Write where the run stands (`tuneyard runs` reads it): its status and facts such as times and figures."""
    path = Path(run_dir) / OUTCOME_FILE
    staging = path.with_name(f"{OUTCOME_FILE}.{os.getpid()}")
    staging.write_text(json.dumps({"status": status, **facts}, default=str) + "\n")
    staging.replace(path)


def read_outcome(run_dir: Path) -> dict:
    """What `record_outcome` last wrote ({} for none, or a damaged file)."""
    try:
        outcome = json.loads((Path(run_dir) / OUTCOME_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return outcome if isinstance(outcome, dict) else {}


def read_status(run_dir: Path) -> str:
    """The last status line a run wrote (empty when none)."""
    path = Path(run_dir) / STATUS_FILE
    return path.read_text().strip() if path.exists() else ""


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders that were fully written, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()]
    return sorted(found, key=_step_of)


def retire_old_checkpoints(run_dir: Path, keep_last: int, best: Path | None = None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (and `best`), and unfinished ones older than those.

    Called only after the newest checkpoint is marked complete, so a crash at any moment of a save
    leaves at least one complete checkpoint (with keep_last 1 too).
    """
    keep = complete_checkpoints(run_dir)[-keep_last:]
    if not keep:
        return
    for folder in (Path(run_dir) / "checkpoints").glob("checkpoint-*"):
        if _step_of(folder) < _step_of(keep[0]) and (best is None or folder.name != best.name):
            shutil.rmtree(folder, ignore_errors=True)


def note_heartbeat(run_dir: Path, who: str, step: int, phase: str) -> None:
    """Note in RUN_DIR/ranks/`who` that this rank `phase` ("began", "finished") step `step`, and when."""
    folder = Path(run_dir) / HEARTBEATS
    folder.mkdir(exist_ok=True)
    staging = folder / f"{who}.tmp"
    staging.write_text(json.dumps({"step": step, "phase": phase, "time": time.time()}))
    staging.replace(folder / who)


def clear_heartbeats(run_dir: Path) -> None:
    """Forget the last attempt's heartbeats (before the workers of a new one start)."""
    shutil.rmtree(Path(run_dir) / HEARTBEATS, ignore_errors=True)


def last_sign_of(run_dir: Path, rank: int, now: float | None = None, role: str = "rank") -> str:
    """What rank `rank` (of a PPO `role`) last noted ("finished step 3, 25 s before"), or "" when it noted nothing."""
    try:
        beat = json.loads((Path(run_dir) / HEARTBEATS / f"{role}-{rank}").read_text())
        step, phase, noted = beat["step"], beat["phase"], beat["time"]
    except (OSError, ValueError, KeyError):
        return ""
    return f"{phase} step {step}, {(time.time() if now is None else now) - noted:.0f} s before"


class DiskFull(TrainingFailed):
    """A save failed because the output filesystem is full; what was saved before is intact."""


def out_of_space(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write was for want of disk space (torch's writer hides the errno, so free space decides)."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(current):
            return True
        current = current.__cause__ or current.__context__
    existing = next((p for p in [Path(folder), *Path(folder).parents] if p.exists()), Path("/"))
    return shutil.disk_usage(existing).free < LOW_SPACE_BYTES


def disk_full_message(what: str, run_dir: Path) -> str:
    """One paragraph for a save that ran out of space: what failed, what is intact, what to do."""
    free = shutil.disk_usage(run_dir).free / 2**20
    done = complete_checkpoints(run_dir)
    intact = f"The newest complete checkpoint, {done[-1]}, is intact" if done else "No complete checkpoint exists yet"
    return (
        f"{what} failed: no space left on the disk of {run_dir} ({free:.1f} MiB free). {intact}, and so is any "
        "earlier final/. Free some space (or move output.dir, or lower output.keep_last), then run the job "
        "again to resume."
    )


class ReportsFullDisk:
    """Trainer mixin: a checkpoint save that fills the disk ends the run with `DiskFull`, keeping older saves.

    The half-written folder is removed (it was never marked complete, so resume would skip it anyway).
    """

    def _save_checkpoint(self, model, trial) -> None:
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:
            if not out_of_space(exc, folder):
                raise
            if self.state.is_world_process_zero:
                shutil.rmtree(folder, ignore_errors=True)
            raise DiskFull(disk_full_message(f"saving {folder.name}", folder.parent.parent)) from None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        run_dir = Path(self.args.output_dir).parent
        pause_in_save("weights", self.state.global_step, run_dir, rank=self.args.process_index)
        super()._save_optimizer_and_scheduler(output_dir)


def prepare_run_dir(output: OutputConfig, identity: str, lineage: str | None = None) -> Path:
    """Create or adopt the run directory, refusing one that holds a different job's run.

    A run of the same `lineage` (`run_lineage`: only training.max_steps, epochs or ppo.iterations changed) is
    the same run, extended: it resumes from its newest complete checkpoint.
    """
    run_dir = Path(output.dir)
    run_file = run_dir / RUN_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.dir '{run_dir}' is a file, not a folder; choose another output.dir")
    blocked = next((p for p in run_dir.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UserError(
            f"output.dir '{run_dir}' cannot be created: '{blocked}' is a file, not a folder; choose another output.dir"
        )
    if run_file.exists():
        recorded = json.loads(run_file.read_text())
        owner = recorded.get("identity")
        explicit_resume = output.resume not in ("auto", "never")
        extended = owner != identity and lineage is not None and recorded.get("lineage") == lineage
        if extended and (run_dir / "final").is_dir() and not complete_checkpoints(run_dir) and not output.overwrite:
            raise UserError(
                f"output.dir '{run_dir}' holds this job's finished run with a different training length, but no "
                "checkpoint to continue it from (output.save_steps was 0, or keep_last retired them); set "
                "output.overwrite: true to train the new length from the start, or start from its model "
                f"(model.name_or_path: {run_dir / 'final'}) in a new output.dir"
            )
        if owner != identity and not (extended or output.overwrite or explicit_resume):
            raise UserError(
                f"output.dir '{run_dir}' holds another job's run (its settings differ from this job's). "
                "Choose a new output.dir, set output.overwrite: true to replace it, or output.resume: PATH "
                "to continue from one of its checkpoints."
            )
        if output.overwrite and not explicit_resume:
            remove_all_but_slurm_output(run_dir)
        elif output.resume == "never" and (complete_checkpoints(run_dir) or (run_dir / "final").exists()):
            raise UserError(
                f"output.dir '{run_dir}' already has checkpoints and output.resume is never; "
                "set output.resume: auto to continue, or output.overwrite: true to start again"
            )
    elif run_dir.exists() and any(run_dir.iterdir()) and not output.overwrite:
        raise UserError(
            f"output.dir '{run_dir}' is not empty and is not a tuneyard run; "
            "choose another output.dir or set output.overwrite: true"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "logs").mkdir(exist_ok=True)
        run_file.write_text(json.dumps({"identity": identity, **({"lineage": lineage} if lineage else {})}))
    except OSError as exc:  # a read-only place, a missing permission, a filesystem such as /proc
        where = f" ('{exc.filename}')" if exc.filename else ""
        raise UserError(
            f"output.dir '{run_dir}' cannot be created: {exc.strerror or exc}{where}; choose an output.dir on a "
            "disk you can write to, or create that folder and give yourself write access to it"
        ) from None
    return run_dir


def remove_all_but_slurm_output(run_dir: Path) -> None:
    """Empty a run directory to start again, keeping logs/slurm-*.out: a SLURM job writes its output there from
    before this process started, and the file it has open must stay where `tuneyard logs` reads it."""
    logs = run_dir / "logs"
    for entry in [*run_dir.iterdir(), *(logs.iterdir() if logs.is_dir() else [])]:
        if entry == logs or (entry.parent == logs and entry.name.startswith("slurm-")):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()


def resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to continue from: the newest complete one (auto), none (never), or a given path."""
    if resume == "never":
        return None
    if resume == "auto":
        done = complete_checkpoints(run_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"output.resume: checkpoint folder '{resume}' does not exist")
    return path


def publish_final(staging: Path, final: Path) -> None:
    """Swap a fully written staging folder into place; the old `final/` survives any failure before."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
