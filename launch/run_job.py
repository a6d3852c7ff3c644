"""Running one job: run directory, preflight checks, the Ray workers, live progress, before/after."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuneyard.cluster.config import ClusterConfig
from tuneyard.cluster.ray_cluster import ClusterError, local_ray_starting, ray_starting
from tuneyard.cluster.resources import check_local_machine, wait_for_resources
from tuneyard.launch.before_after import final_folder, format_figures, stage_figures, starting_point
from tuneyard.launch.config import JobConfig, dump_job
from tuneyard.launch.failures import find_reported_error, raised_by_training, worker_failures
from tuneyard.launch.plan.host import base_demand
from tuneyard.launch.preflight import TORCH_ADAMW, check_disk, preflight, prepare_resume_world_size
from tuneyard.launch.prepare import prepare_data
from tuneyard.launch.progress import ProgressFollower
from tuneyard.training.errors import TrainingFailed, UserError
from tuneyard.training.faults import forwarded_faults
from tuneyard.training.interrupts import driver_phase
from tuneyard.training.metrics import append_metrics, read_metrics
from tuneyard.training.preemption import Preempted, preemption_watch
from tuneyard.training.run_dir import (
    clear_heartbeats,
    finished_run,
    job_identity,
    prepare_run_dir,
    read_outcome,
    record_outcome,
    run_lineage,
    set_status,
)
from tuneyard.training.stages import stage_spec
from tuneyard.training.tracking import tracker_env

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Where the run landed and the figures (before, after) that show whether it learned."""

    run_dir: Path
    seconds: float
    figures: dict[str, tuple[float, float]] = field(default_factory=dict)
    note: str = ""  # said before the figures (a finished run that was not trained again)

    @property
    def eval_loss_before(self) -> float | None:
        """Eval loss of the starting model (the step-0 evaluation)."""
        return self.figures["eval loss"][0] if "eval loss" in self.figures else None

    @property
    def eval_loss_after(self) -> float | None:
        """Eval loss at the end of training."""
        return self.figures["eval loss"][1] if "eval loss" in self.figures else None

    def figure(self) -> str:
        """The before/after lines printed at the end of a job."""
        lines = [f"run: {self.run_dir}  ({self.seconds:.0f}s)", *format_figures(self.figures)]
        return "\n".join([self.note, *lines] if self.note else lines)


def worker_payload(job: JobConfig, run_dir: Path, use_deepspeed: bool = True) -> dict:
    """What a stage's recipe receives: the run directory, the training spec, the stage sections, faults, trackers."""
    return {
        "run_dir": str(run_dir),
        "spec": job.train_spec(use_deepspeed).model_dump(mode="json"),
        "sections": job.stage_sections().model_dump(mode="json"),
        "faults": forwarded_faults(),
        "tracker_env": tracker_env(),  # for a Ray cluster this process did not start
    }


def unused_packages(job: JobConfig) -> tuple[str, ...]:
    """Packages the workers' imports would load but this job never calls, so they are kept out of the workers.

    PEFT imports bitsandbytes, and bitsandbytes imports torch's compiler: CPU time in every worker's start-up.
    Only QLoRA, bitsandbytes' optimizers and a quantised model use it; a hub id may name a quantised model.
    """
    start = job.model.name_or_path if job.model.init == "pretrained" else None
    sources = [start, job.reward.model, job.distill.teacher]

    def maybe_quantised(source: str) -> bool:
        config = Path(source) / "config.json"
        return not config.is_file() or "quantization_config" in json.loads(config.read_text())

    uses_bitsandbytes = (
        job.peft.method == "qlora"
        or job.training.optim not in TORCH_ADAMW
        or any(maybe_quantised(source) for source in sources if source)
    )
    return () if uses_bitsandbytes else ("bitsandbytes",)


def run_on_ray(job: JobConfig, run_dir: Path) -> None:
    """Run the job's workers as a group of Ray actors (`tuneyard.cluster.worker_group`) on the current Ray cluster.

    A lost worker (its process died, or a collective lost or waited for it) ends the attempt; the next one
    resumes from the newest complete checkpoint, up to `training.max_failures` times. A user's mistake, or an
    error the training code raised in the ranks (no rank died), is reported at once, not retried.
    """
    from tuneyard.cluster.worker_group import run_spmd_workers

    cluster: ClusterConfig = job.cluster
    set_status(run_dir, "checking the Ray cluster's resources")
    wait_for_resources(cluster)  # a placement group would wait forever, silently, for workers that cannot fit
    entry = f"{stage_spec(job.stage).recipe}:ray_worker"  # imported in the worker: the driver stays light
    for attempt in range(job.training.max_failures + 1):
        payload = worker_payload(job, run_dir)
        if attempt:  # this run's own newest checkpoint, whatever the job said
            payload["spec"]["output"]["resume"] = "auto"
        clear_heartbeats(run_dir)
        set_status(
            run_dir, f"starting {cluster.workers} Ray worker(s)" + (f", attempt {attempt + 1}" if attempt else "")
        )
        try:
            run_spmd_workers(entry, payload, cluster, unused_packages(job))
            return
        except Exception as exc:
            reported = find_reported_error(exc)
            if reported is not None:
                raise reported from None
            failed = worker_failures(exc, run_dir, cluster.workers)
            if raised_by_training(exc):  # the same code on the same data raises again: a restart only costs time
                raise TrainingFailed(
                    f"training failed: {failed}. No worker was lost: the training code raised this error, so "
                    f"restarting would meet it again and the run was not retried; all workers' logs are in "
                    f"{run_dir / 'logs'}. Fix the cause, then run the job again to resume from its newest "
                    "complete checkpoint."
                ) from None
            if attempt == job.training.max_failures:
                raise TrainingFailed(
                    f"training failed: {failed}. The {attempt} restart(s) that training.max_failures allows are "
                    f"used up; all workers' logs are in {run_dir / 'logs'}. Run the job again to resume from its "
                    "newest complete checkpoint."
                ) from None
            log.warning("a worker was lost (%s); restarting from the newest complete checkpoint", failed)
            append_metrics(run_dir / "metrics.jsonl", {"event": "restart", "reason": failed, "time": time.time()})


def run_ppo_on_ray(job: JobConfig, run_dir: Path) -> None:
    """Run the PPO controller here, its role groups as Ray actors on the current cluster."""
    from tuneyard.rlhf.ppo.controller import run_ppo

    try:
        run_ppo(job.train_spec(), job.ppo, job.reward, run_dir, job.cluster)
    except (UserError, ClusterError, TrainingFailed):
        raise
    except Exception as exc:
        reported = find_reported_error(exc)
        if reported is not None:
            raise reported from None
        raise RuntimeError(
            f"PPO failed ({type(exc).__name__}); the role actors' logs are in {run_dir / 'logs'}"
        ) from exc


def run_single(job: JobConfig, run_dir: Path) -> None:
    """The whole job in this process: no Ray, no DeepSpeed, breakpoints work (one GPU or a laptop)."""
    import importlib

    recipe = importlib.import_module(stage_spec(job.stage).recipe)
    recipe.run_in_process(worker_payload(job, run_dir, use_deepspeed=False))


def eval_metric_figures(run_dir: Path) -> dict[str, tuple[float, float]]:
    """The first and last eval accuracy and F1 a run recorded (the task heads' trainer computes them)."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    figures = {}
    for key, name in (("eval_accuracy", "eval accuracy"), ("eval_f1", "eval F1")):
        values = [r[key] for r in records if key in r]
        if values:
            figures[name] = (values[0], values[-1])
    return figures


def eval_loss_figure(run_dir: Path) -> dict[str, tuple[float, float]]:
    """The first and last eval loss a run recorded in its metrics.jsonl (none if it never evaluated)."""
    evals = [r["eval_loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "eval_loss" in r]
    return {"eval loss": (evals[0], evals[-1])} if evals else {}


def run_job(job: JobConfig, show_progress: bool = True, single: bool = False) -> RunResult:
    """Run one job end to end (on Ray, or in this process with `single`) and return its before/after figures.

    RUN_DIR/outcome.json says where the run stands throughout: running (this process), then finished,
    preempted, interrupted or failed.
    """
    if job.peft.method == "adalora" and not single:
        raise UserError(
            "peft.method adalora scores its ranks from the gradients after each optimizer step, which DeepSpeed "
            "clears inside its own step, so it runs in one process: `tuneyard train JOB.yaml --single` (or use "
            "peft.method lora on Ray)"
        )
    if single and not stage_spec(job.stage).single:
        raise UserError(
            f"stage {job.stage} runs its roles as Ray actors; --single is not supported for it (drop --single)"
        )
    if single and job.training.sequence_parallel > 1:
        raise UserError(
            f"training.sequence_parallel ({job.training.sequence_parallel}) shares each sequence over that many "
            "ranks, and --single runs one: drop --single (a local Ray runs cluster.workers ranks on this machine), or "
            "set training.sequence_parallel: 1"
        )
    started = time.time()
    dump = job.identity_dump()
    identity = job_identity(dump)
    finished = finished_run(job.output, identity)
    if finished is not None:  # resuming its last checkpoint would train past the end (step 151/150)
        return finished_result(finished.resolve())
    run_dir = prepare_run_dir(job.output, identity, run_lineage(dump)).resolve()
    # an attempt that trained and published final/, then was stopped while scoring, leaves only the figures to do
    trained = read_outcome(run_dir).get("trained") == identity
    (run_dir / "job.yaml").write_text(dump_job(job))
    record_outcome(run_dir, "running", pid=os.getpid(), host=socket.gethostname(), started=started)
    try:
        if trained:
            log.info("%s: trained and published earlier; scoring its figures", run_dir)
            start, before = starting_point(job), None
        else:
            start, before = train(job, run_dir, show_progress, single)
            trained = True
        figures = score_figures(job, run_dir, start, before)
    except BaseException as exc:
        status = (
            "preempted"
            if isinstance(exc, Preempted)
            else "interrupted"
            if isinstance(exc, KeyboardInterrupt)
            else "failed"
        )
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        facts = {"trained": identity} if trained else {}
        record_outcome(run_dir, status, started=started, seconds=time.time() - started, message=message, **facts)
        raise
    record_outcome(run_dir, "finished", started=started, seconds=time.time() - started, figures=figures)
    return RunResult(run_dir=run_dir, seconds=time.time() - started, figures=figures)


def finished_result(run_dir: Path) -> RunResult:
    """What a rerun of a finished run reports: that it is finished, where its model is, and its figures."""
    outcome = read_outcome(run_dir)
    note = (
        f"{run_dir} holds this job's finished run; nothing to train. Its model is in {run_dir / 'final'}. To train "
        "further, raise training.max_steps (or epochs, ppo.iterations): the run resumes from its newest checkpoint; "
        "output.overwrite: true starts it again."
    )
    log.info("%s", note)
    figures = {name: tuple(pair) for name, pair in (outcome.get("figures") or {}).items()}
    return RunResult(run_dir=run_dir, seconds=0.0, figures=figures, note=note)


def train(job: JobConfig, run_dir: Path, show_progress: bool, single: bool) -> tuple[str | None, dict | None]:
    """Check, train and publish final/ in `run_dir`; the starting model, and its figures where scored already."""
    # A local Ray starts in the background while the driver checks the job (the CLI starts it sooner still);
    # the workers start only once the checks pass.
    ray_session = contextlib.nullcontext(lambda: None) if single else ray_starting(job.cluster, base_demand(job))
    with ray_session as wait_for_ray:
        driver_phase("checking the job", run_dir)
        preflight(job)
        prepare_resume_world_size(job, run_dir, single)
        check_disk(job, run_dir)
        start = starting_point(job)
        # The starting model does not change while the workers train, so it is scored after them: the first
        # step comes sooner and the driver holds no model while the workers load theirs. A start inside
        # this run's folder (a final/ that this run replaces) is scored first.
        before = None
        if start is not None and Path(start).resolve().is_relative_to(run_dir):
            driver_phase("scoring the starting model", run_dir)
            before = stage_figures(job, start)
        follow = ProgressFollower(run_dir / "metrics.jsonl", job.stage) if show_progress else contextlib.nullcontext()
        if not single and local_ray_starting():  # a local Ray was sized to the job: does this machine hold it?
            check_local_memory(job)
        # the driver tokenises before any process group exists, so no rank waits in a barrier while another does
        tokenise = not single and stage_spec(job.stage).tokenised_on_driver
        streamed = tokenise and job.data.streaming  # tokenised by Ray tasks, so once Ray is up
        starting = "loading" if single else "starting Ray"
        set_status(run_dir, "tokenising the data (cached for later runs)" if tokenise and not streamed else starting)
        # the progress line comes first, so it shows what start-up is doing while the data and Ray get ready
        with follow:
            if tokenise and not streamed:  # outside the preemption watch: a stop now has nothing to save
                driver_phase("tokenising the data", run_dir)
                log.info("%s", prepare_data(job).summary())
                set_status(run_dir, starting)
            driver_phase(starting, run_dir)
            wait_for_ray()
            if single:
                with preemption_watch(run_dir):
                    driver_phase("training", run_dir)
                    run_single(job, run_dir)
            elif stage_spec(job.stage).controller:
                with preemption_watch(run_dir):
                    run_ppo_on_ray(job, run_dir)
            else:
                if streamed:  # an interrupted preparation keeps its finished shards for the rerun
                    driver_phase("tokenising the data", run_dir)
                    log.info(
                        "%s", prepare_data(job, on_ray=True, report=lambda line: set_status(run_dir, line)).summary()
                    )
                with preemption_watch(run_dir):
                    driver_phase("running the workers", run_dir)
                    run_on_ray(job, run_dir)
    return start, before


def score_figures(job: JobConfig, run_dir: Path, start: str | None, before: dict | None) -> dict[str, tuple]:
    """The before/after figures of the job's stage: the trained final/ against the starting model."""
    driver_phase("scoring the figures", run_dir)
    figures = eval_loss_figure(run_dir)
    figures.update(eval_metric_figures(run_dir))
    after = stage_figures(job, final_folder(run_dir))
    if before is None:
        # a start inside the run's folder is replaced by now: only a figure scored before training has it
        inside = start is not None and Path(start).resolve().is_relative_to(run_dir)
        before = {} if inside else stage_figures(job, start)
    figures.update({name: (before[name], after[name]) for name in before})
    return figures


def check_local_memory(job: JobConfig) -> None:
    """Refuse, before any worker starts, a job whose workers' memory (the plan's) exceeds what this machine has free."""
    from tuneyard.launch.plan.host import local_demand

    try:
        demand = local_demand(job)
    except UserError as exc:  # a hub model not on disk: the plan cannot count it (Ray's start checked the base)
        log.warning("local memory check skipped: %s", str(exc).split(";")[0])
        return
    check_local_machine(demand, job.cluster.oversubscribe)
