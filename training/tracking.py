"""Experiment trackers (`training.report_to`): TensorBoard, W&B and MLflow through transformers' own callbacks.

Rank 0 feeds them the very records it writes to metrics.jsonl (read back from the file), so a tracker's
curve is metrics.jsonl's; the resolved job (RUN_DIR/job.yaml) is each tracker run's config. PPO's controller,
which has no Trainer, drives the same `Trackers` from its own records.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import yaml

from tuneyard.training.config import TrainingConfig
from tuneyard.training.errors import UserError

if TYPE_CHECKING:
    from transformers import TrainerCallback

log = logging.getLogger(__name__)

TRACKERS_EXTRA = 'pip install "tuneyard[tracking]"'
# what each tracker needs importable; the default MLflow store is a SQLite file (the file store is refused)
PACKAGES = {
    "tensorboard": ("tensorboard or tensorboardX", ("tensorboard", "tensorboardX")),
    "wandb": ("wandb", ("wandb",)),
    "mlflow": ("mlflow (mlflow-skinny), sqlalchemy and alembic", ("mlflow", "sqlalchemy", "alembic")),
}
# settings of the user's environment the workers need too; credentials stay out (see `tracker_env`)
FORWARDED_PREFIXES = ("WANDB_", "MLFLOW_", "TENSORBOARD_")
SECRET_WORDS = ("KEY", "TOKEN", "PASSWORD", "SECRET", "AUTH", "CREDENTIAL")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_packages(tracker: str) -> str | None:
    """What `tracker` lacks in this environment, in words, or None when it can run."""
    words, modules = PACKAGES[tracker]
    if tracker == "tensorboard":
        return None if any(_importable(m) for m in modules) else words
    if tracker == "mlflow" and os.environ.get("MLFLOW_TRACKING_URI"):
        modules = ("mlflow",)  # a tracking server or the user's own store: no SQLite file of ours
    return None if all(_importable(m) for m in modules) else words


def missing_tracker_message(tracker: str, missing: str) -> str:
    """The one paragraph that says a tracker in training.report_to cannot run and how to fix it."""
    return (
        f"training.report_to lists {tracker}, but {missing} is not installed in this environment; install the "
        f"trackers with `{TRACKERS_EXTRA}` (or the package alone), or drop {tracker} from training.report_to"
    )


def check_trackers(training: TrainingConfig) -> None:
    """Preflight: refuse a tracker the user asked for whose package is missing; a default one is skipped later."""
    asked = "report_to" in training.model_fields_set
    for tracker in training.report_to:
        missing = missing_packages(tracker)
        if missing and (asked or tracker != "tensorboard"):
            raise UserError(missing_tracker_message(tracker, missing))


def tracker_env() -> dict[str, str]:
    """The user's tracker settings in this (driver) environment, for workers on a Ray cluster started elsewhere.

    They travel as Ray task arguments, which Ray's dashboard can show: credentials (API keys, passwords,
    tokens, a URI with a password) do not travel; a worker reads those from its own node's environment.
    """
    forwarded = {}
    for name, value in os.environ.items():
        if not name.startswith(FORWARDED_PREFIXES) or any(word in name for word in SECRET_WORDS):
            continue
        if "://" in value and (urlsplit(value).password or urlsplit(value).username):
            continue
        forwarded[name] = value
    return forwarded


def apply_tracker_env(forwarded: dict[str, str]) -> None:
    """In a worker: take the driver's tracker settings (see `tracker_env`)."""
    os.environ.update(forwarded)


@contextlib.contextmanager
def _environment(defaults: dict[str, str], overrides: dict[str, str]) -> Iterator[None]:
    """Set `defaults` where unset and `overrides` always, for the block only: one process may run many jobs."""
    values = {**{k: v for k, v in defaults.items() if k not in os.environ}, **overrides}
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def read_job(run_dir: Path) -> dict:
    """The resolved job of a run (RUN_DIR/job.yaml, written before any worker starts); {} when absent."""
    path = Path(run_dir) / "job.yaml"
    if not path.exists():
        return {}
    return yaml.safe_load(path.read_text()) or {}


@dataclass
class JobArguments:
    """What the tracker callbacks read of their `args`: the run's name and folder, and the job as its config.

    Not a TrainingArguments: building one in a worker resets accelerate's process state under the
    running trainer (training_args.py: AcceleratorState._reset_state), and its dict would log
    the Trainer's defaults, not the job.
    """

    output_dir: str
    run_name: str
    job: dict = field(default_factory=dict)
    load_best_model_at_end: bool = False

    def to_dict(self) -> dict:
        """The resolved job (the callbacks log this as the run's config / params)."""
        return dict(self.job)

    def to_json_string(self) -> str:
        """The resolved job as JSON (TensorBoard's `args` text)."""
        return json.dumps(self.job, indent=2)


def tracker_figures(record: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl record a tracker plots (not its step or wall time)."""
    return {
        k: v
        for k, v in record.items()
        if k not in ("step", "time") and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


class Trackers:
    """The integration callbacks of `report_to` for one run, fed metrics.jsonl's records on rank 0 (or PPO's driver)."""

    def __init__(self, report_to: list[str], run_dir: Path):
        self.run_dir = Path(run_dir)
        self.names = []
        for tracker in report_to:
            missing = missing_packages(tracker)
            if missing and tracker == "tensorboard":  # preflight refused it if the user asked for it
                log.info("training.report_to: tensorboard skipped (%s not installed)", missing)
            elif missing:
                raise UserError(missing_tracker_message(tracker, missing))
            else:
                self.names.append(tracker)
        from transformers import TrainerControl, TrainerState  # here: the driver imports this module too

        self.callbacks: list[TrainerCallback] = []
        self.args: JobArguments | None = None
        self.state = TrainerState(is_world_process_zero=True, is_local_process_zero=True)
        self.control = TrainerControl()

    def defaults(self) -> dict[str, str]:
        """Where each tracker writes unless the user's environment says otherwise: all inside the run directory."""
        return {
            "TENSORBOARD_LOGGING_DIR": str(self.run_dir / "tensorboard"),
            "WANDB_DIR": str(self.run_dir),
            "WANDB_PROJECT": "tuneyard",
            "MLFLOW_TRACKING_URI": f"sqlite:///{self.run_dir / 'mlflow.db'}",
            "MLFLOW_EXPERIMENT_NAME": "tuneyard",
        }

    def start(self) -> None:
        """Open each tracker's run, named after the run directory, with the resolved job as its config."""
        if not self.names:
            return
        from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

        self.args = JobArguments(str(self.run_dir), self.run_dir.name, read_job(self.run_dir))
        # the job is nested: MLflow params are flat key/value strings of at most 250 characters
        with _environment(self.defaults(), {"MLFLOW_FLATTEN_PARAMS": "TRUE"}):
            for name in self.names:
                if name == "tensorboard":
                    self.callbacks.append(TensorBoardCallback())
                elif name == "wandb":
                    self.callbacks.append(WandbCallback())
                else:
                    self._prepare_mlflow()
                    self.callbacks.append(MLflowCallback())
            for callback in self.callbacks:
                callback.on_train_begin(self.args, self.state, self.control)

    def _prepare_mlflow(self) -> None:
        """Point MLflow at this run's store (its tracking URI is process-wide), artifacts beside the default store."""
        import mlflow

        uri = os.environ["MLFLOW_TRACKING_URI"]
        mlflow.set_tracking_uri(uri)
        if uri == self.defaults()["MLFLOW_TRACKING_URI"]:
            name = os.environ["MLFLOW_EXPERIMENT_NAME"]
            if mlflow.get_experiment_by_name(name) is None:  # else MLflow puts artifacts under ./mlruns
                mlflow.create_experiment(name, artifact_location=(self.run_dir / "mlartifacts").as_uri())

    def log(self, record: dict) -> None:
        """Hand one metrics.jsonl record (a logged step or an evaluation) to every tracker at its step."""
        figures = tracker_figures(record)
        if not self.callbacks or "event" in record or "step" not in record or not figures:
            return
        self.state.global_step = int(record["step"])
        for callback in self.callbacks:
            callback.on_log(self.args, self.state, self.control, logs=dict(figures))

    def finish(self, failed: bool = False) -> None:
        """Close each tracker's run (flushing it to disk or its server); a failed run is marked so where it can be."""
        for callback in self.callbacks:
            if failed and type(callback).__name__ == "MLflowCallback":
                import mlflow

                if mlflow.active_run() is not None:
                    mlflow.end_run(status="FAILED")
            callback.on_train_end(self.args, self.state, self.control)
        if "wandb" in self.names and "wandb" in sys.modules:
            import wandb

            if wandb.run is not None:  # the callback leaves its run open; the next job in this process would reuse it
                wandb.finish(exit_code=1 if failed else 0)
        self.callbacks = []


@contextlib.contextmanager
def tracked(report_to: list[str], run_dir: Path) -> Iterator[Trackers]:
    """Trackers open for the block and closed after it (marked failed if it raised)."""
    trackers = Trackers(report_to, run_dir)
    trackers.start()
    try:
        yield trackers
    except BaseException:
        trackers.finish(failed=True)
        raise
    trackers.finish()


class MetricsTail:
    """The records appended to a metrics.jsonl since the last read (a line still being written waits)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def new_records(self) -> list[dict]:
        """Complete records written since the last call."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        records = []
        for line in complete.decode(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
        return records
