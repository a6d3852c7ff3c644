"""`tuneyard pipeline FILE`: an ordered list of stage jobs, each starting from an earlier one's output."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import yaml

from tuneyard.cluster.ray_cluster import ray_cluster
from tuneyard.launch.config import JobConfig, describe_yaml_error, load_job, load_yaml
from tuneyard.launch.run_job import RunResult, eval_loss_figure, run_job
from tuneyard.training.errors import UserError
from tuneyard.training.run_dir import RUN_FILE, job_identity


def load_pipeline(path: Path) -> list[JobConfig]:
    """The pipeline's jobs, validated in order: `stages: [{job: FILE, overrides: [k=v, ...]}, ...]`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pipeline file {path} does not exist")
    try:
        spec = load_yaml(path.read_text(errors="replace"), path) or {}
    except yaml.YAMLError as exc:
        raise UserError(describe_yaml_error(exc, path)) from None
    stages = spec.get("stages") if isinstance(spec, dict) else None
    if not isinstance(stages, list) or not stages:
        raise UserError(f"{path}: a pipeline is `stages:` followed by a list of `- job: FILE` entries")
    jobs = []
    for i, stage in enumerate(stages):
        stage = {"job": stage} if isinstance(stage, str) else stage
        if not isinstance(stage, dict) or "job" not in stage or set(stage) - {"job", "overrides"}:
            raise UserError(f"{path}: stages[{i}] must be `job: FILE` with optional `overrides: [key=value, ...]`")
        jobs.append(load_job(stage["job"], stage.get("overrides") or []))
    return jobs


def finished_earlier(job: JobConfig) -> bool:
    """Whether the job's output dir already holds this very job's finished `final/`."""
    run_dir = Path(job.output.dir)
    if not (run_dir / "final").is_dir() or not (run_dir / RUN_FILE).exists():
        return False
    owner = json.loads((run_dir / RUN_FILE).read_text()).get("identity")
    return owner == job_identity(job.identity_dump())


def recorded_result(job: JobConfig) -> RunResult:
    """The eval-loss figure of a finished run, read back from its metrics.jsonl."""
    return RunResult(Path(job.output.dir), 0.0, eval_loss_figure(Path(job.output.dir)))


def run_pipeline(path: Path, single: bool = False, force: bool = False) -> list[tuple[str, RunResult, bool]]:
    """Run the stages in order on one Ray session, skipping those already finished; (stage, result, skipped)."""
    jobs = load_pipeline(path)
    results = []
    session = contextlib.nullcontext() if single else ray_cluster(jobs[0].cluster)
    with session:
        for job in jobs:
            if finished_earlier(job) and not force:
                result, skipped = recorded_result(job), True
            else:
                result, skipped = run_job(job, single=single), False
            label = f"[{job.stage}] " + ("skipped, finished earlier: " if skipped else "")
            print(label + result.figure(), flush=True)
            results.append((job.stage, result, skipped))
    return results
