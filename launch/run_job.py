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
from tuneyard.cluster.ray_cluster import ClusterError, ray_starting
from tuneyard.cluster.resources import wait_for_resources
from tuneyard.launch.before_after import final_folder, format_figures, stage_figures, starting_point
from tuneyard.launch.config import PREFERENCE_STAGES, JobConfig, dump_job
from tuneyard.launch.prepare import TOKENISED_STAGES, prepare_data
from tuneyard.launch.progress import ProgressFollower
from tuneyard.training.config import ADAPTER_METHODS
from tuneyard.training.data.labels import TASK_HEAD_STAGES
from tuneyard.training.data.shards import plan_tasks
from tuneyard.training.data.sources import read_splits
from tuneyard.training.data.tokenize import CHAT_FORMATS, cache_key, default_cache_dir, tokenize_chat
from tuneyard.training.errors import TrainingFailed, UserError
from tuneyard.training.faults import forwarded_faults
from tuneyard.training.metrics import append_metrics, read_metrics
from tuneyard.training.model import check_model_source, load_tokenizer
from tuneyard.training.preemption import preemption_watch
from tuneyard.training.run_dir import (
    check_resume_world_size,
    clear_heartbeats,
    job_identity,
    last_sign_of,
    prepare_run_dir,
    record_outcome,
    resume_checkpoint,
    set_status,
)
from tuneyard.training.tracking import check_trackers, tracker_env

log = logging.getLogger(__name__)

TORCH_ADAMW = ("adamw_torch", "adamw_torch_fused")  # the default; PPO's roles build torch's AdamW themselves


@dataclass
class RunResult:
    """Where the run landed and the figures (before, after) that show whether it learned."""

    run_dir: Path
    seconds: float
    figures: dict[str, tuple[float, float]] = field(default_factory=dict)

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
        return "\n".join([f"run: {self.run_dir}  ({self.seconds:.0f}s)", *format_figures(self.figures)])


def find_reported_error(exc: BaseException) -> BaseException | None:
    """Dig a UserError, ClusterError or TrainingFailed out of the wrappers Ray puts around a worker's exception.

    Each is reported as it is, not retried: a retry would meet the same mistake, full disk or NaNs.
    """
    seen, queue = set(), [exc]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError | ClusterError | TrainingFailed):
            return current
        for name in ("__cause__", "__context__", "cause", "error", "_error"):
            child = getattr(current, name, None)
            if isinstance(child, BaseException):
                queue.append(child)
        for name in ("worker_failures", "errors"):
            children = getattr(current, name, None)
            if isinstance(children, dict):
                queue.extend(c for c in children.values() if isinstance(c, BaseException))
            elif isinstance(children, list | tuple):
                queue.extend(c for c in children if isinstance(c, BaseException))
    return None


def preflight(job: JobConfig) -> None:
    """Catch the user's mistakes on the driver, before any worker starts."""
    if job.model.init == "pretrained":
        assert job.model.name_or_path is not None
        check_model_source(job.model.name_or_path, allow_pickle=job.model.allow_pickle)
    check_training_options(job)
    check_trackers(job.training)
    if job.stage == "ppo":
        from tuneyard.rlhf.ppo.controller import prepare_ppo

        prepare_ppo(job.train_spec(), job.ppo, job.reward)  # data, prompt lengths, rewards, the critic's start
        return
    tokenizer = load_tokenizer(job.model, job.data.chat_template)
    check_chat_template(job, tokenizer)
    if job.stage in PREFERENCE_STAGES:
        from tuneyard.rlhf.preference_recipe import RL_STAGES, check_teacher, reward_functions
        from tuneyard.rlhf.trl_rows import rlhf_datasets

        rlhf_datasets(job.stage, job.data, tokenizer, job.training.seed)  # format, fields, pairs, empty data
        if job.stage in RL_STAGES:  # named functions registered, the reward model a one-output classifier
            reward_functions(job.stage, job.preference_spec(), allow_pickle=job.model.allow_pickle)
        if job.stage == "distill" and job.distill.teacher:  # a model folder of the student's vocabulary
            check_teacher(job.distill.teacher, tokenizer, allow_pickle=job.model.allow_pickle)
        return
    if job.stage in TASK_HEAD_STAGES:  # fields, BIO tags, label sets, each refused at its file:line
        from tuneyard.training.data.labels import task_datasets

        task_datasets(job.stage, job.data, tokenizer, job.training.seed)
        return
    if job.data.streaming:  # rows are checked as the shards are tokenised: reading them all here is what it avoids
        plan_tasks(job.data)  # the sources exist and are files it reads
        return
    cache = default_cache_dir(job.data, job.output) / cache_key(job.stage, job.data, tokenizer, job.training.seed)
    if not (cache / "ready").exists():
        train, _ = read_splits(job.data, job.training.seed)  # malformed rows, missing fields, empty data
        calling = next((row for row in train if any(m.get("tool_calls") for m in row.get("messages", []))), None)
        if calling is not None:  # refused when the chat template would leave the calls out
            tokenize_chat(tokenizer, calling["messages"], job.data.train_on, calling.get("tools"))


def check_training_options(job: JobConfig) -> None:
    """training.optim names an optimizer transformers has; early stopping and keep_best have evaluations to read."""
    training, output = job.training, job.output
    if training.optim not in TORCH_ADAMW:  # transformers has these: its Trainer's modules cost the driver 1 s
        from transformers.training_args import OptimizerNames

        names = sorted(o.value for o in OptimizerNames)
        if training.optim not in names:
            raise UserError(
                f"training.optim: '{training.optim}' is not an optimizer transformers has; names are {names}"
            )
    if job.stage == "ppo" and (training.optim not in TORCH_ADAMW or training.early_stopping or output.keep_best):
        raise UserError(
            "training.optim, training.early_stopping and output.keep_best apply to the stages that run a Hugging Face "
            "trainer; PPO's roles use AdamW and keep the last checkpoints: remove them from this job"
        )
    watched = [
        (key, metric)
        for key, metric in (
            ("training.early_stopping", training.early_stopping and training.early_stopping.metric),
            ("output.keep_best", output.keep_best),
        )
        if metric
    ]
    if not watched:
        return
    key = watched[0][0]
    if len({metric.removeprefix("eval_") for _, metric in watched}) > 1:
        raise UserError(
            f"training.early_stopping.metric ({watched[0][1]}) and output.keep_best ({watched[1][1]}) differ; the "
            "trainer tracks one best metric: give both the same"
        )
    has_eval = (bool(job.data.eval) or job.data.eval_fraction > 0) and job.stage not in ("grpo", "rloo")
    if not has_eval or not training.eval_steps:
        raise UserError(
            f"{key} reads evaluations: give held-out data (data.eval or data.eval_fraction; grpo and rloo have "
            "none) and training.eval_steps"
        )
    if output.keep_best and (not output.save_steps or output.save_steps % training.eval_steps):
        raise UserError(
            f"output.keep_best keeps a checkpoint saved where an evaluation scored best, so output.save_steps "
            f"({output.save_steps}) must be a multiple of training.eval_steps ({training.eval_steps})"
        )


def check_chat_template(job: JobConfig, tokenizer) -> None:
    """A chat SFT needs a template to render turns; new template tokens need embeddings that train."""
    source = job.model.tokenizer or job.model.name_or_path
    if job.stage == "sft" and job.data.format in CHAT_FORMATS and not tokenizer.chat_template:
        raise UserError(
            f"the tokenizer of '{source}' has no chat template (a base model), and data.format "
            f"'{job.data.format}' is rendered with one; set data.chat_template: chatml (or a template TRL ships "
            "such as llama3 or qwen3, or a .jinja file)"
        )
    if job.data.chat_template and job.peft.method in ADAPTER_METHODS:
        base = load_tokenizer(job.model)
        added = [t for t in tokenizer.get_vocab() if t not in base.get_vocab()]
        if added:
            raise UserError(
                f"data.chat_template '{job.data.chat_template}' uses tokens the tokenizer of '{source}' lacks "
                f"({', '.join(sorted(added))}); their new embedding rows would stay untrained under "
                f"peft.method {job.peft.method}, so the model could not learn to end a turn. Use peft.method full "
                "or freeze, or a template whose tokens the tokenizer has"
            )


def _first_sentence(text: str, limit: int = 200) -> str:
    """The first sentence of a failure's last line, cut to `limit` characters."""
    lines = text.strip().splitlines()
    line = lines[-1] if lines else ""
    sentence = line.split(". ", 1)[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def worker_failures(exc: BaseException, run_dir: Path, workers: int) -> str:
    """The failed workers of a run (WorkersFailed): rank, node, the failure's last line, its log; dead ones first.

    When one worker dies its peers fail too (a collective loses its partner): the dead one is the cause.
    """
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures:
        return f"{type(exc).__name__}: {_first_sentence(str(exc))}"

    def died(failure: BaseException) -> bool:
        return "ActorDied" in type(failure).__name__ or "actor is dead" in str(failure)

    lines = []
    for rank, failure in sorted(failures.items(), key=lambda item: (not died(item[1]), item[0])):
        log_path = run_dir / "logs" / f"worker-{rank}.log"
        node = ""
        if log_path.exists():
            started = [x for x in log_path.read_text(errors="replace").splitlines() if "runs on Ray node" in x]
            node = f" on node {started[-1].rsplit(' ', 1)[-1][:12]}" if started else ""
        lines.append(f"rank {rank}{node}: {_first_sentence(str(failure)) or type(failure).__name__} (log: {log_path})")
    waited = [rank for rank, failure in failures.items() if "timed out" in str(failure).lower()]
    if waited:  # a collective timed out: the ranks that did not wait in it are the ones that never came
        for rank in sorted(set(range(workers)) - set(failures)):
            sign = last_sign_of(run_dir, rank)
            lines.append(
                f"rank {rank} did not arrive in the collective that rank(s) {', '.join(map(str, sorted(waited)))} "
                f"waited for" + (f" (its last sign: {sign})" if sign else "")
            )
    return "; ".join(lines)


def check_disk(job: JobConfig, run_dir: Path) -> None:
    """Refuse before any worker starts when keep_last checkpoints and final/ would not fit on the output disk."""
    from tuneyard.launch.disk_check import check_free_space

    saves = job.output.save_steps or (job.stage == "ppo" and job.ppo.save_every)
    models = 2 if job.stage == "ppo" else 1  # the critic is saved beside the policy
    # a scratch model's embeddings are as many as the tokenizer's tokens; a pretrained one has its own
    vocab = len(load_tokenizer(job.model, job.data.chat_template)) if job.model.init == "scratch" else 0
    check_free_space(job.train_spec(), run_dir, vocab, job.output.keep_last if saves else 0, models)


def check_world_size_of_resume(job: JobConfig, run_dir: Path, single: bool) -> None:
    """The checkpoint a run would resume from must be partitioned for the job's ranks (ZeRO 1-3)."""
    checkpoint = resume_checkpoint(run_dir, job.output.resume)
    if checkpoint is None:
        return
    if job.stage == "ppo":
        for role in ("policy", "critic"):
            workers = getattr(job.ppo.roles, role).workers
            check_resume_world_size(checkpoint / role, workers, f"ppo.roles.{role}.workers")
    else:
        check_resume_world_size(checkpoint, 1 if single else job.cluster.workers, "cluster.workers")


ENTRY_POINTS = {  # each stage family's worker function, imported in the worker: the driver stays light
    "preference": "tuneyard.rlhf.preference_recipe:ray_worker",
    "task head": "tuneyard.training.task_head_recipe:ray_worker",
    "training": "tuneyard.training.causal_lm_recipe:ray_worker",
}


def unused_packages(job: JobConfig) -> tuple[str, ...]:
    """Packages the workers' imports would load but this job never calls, so they are kept out of the workers.

    PEFT imports bitsandbytes, and bitsandbytes torch's compiler: about 0.9 s of CPU in each worker's start-up.
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

    A worker that dies (or fails for any reason but the user's input) ends the attempt; the next one
    resumes from the newest complete checkpoint, up to `training.max_failures` times. A user's mistake
    raised in a worker is reported at once, not retried.
    """
    from tuneyard.cluster.worker_group import run_spmd_workers

    cluster: ClusterConfig = job.cluster
    set_status(run_dir, "checking the Ray cluster's resources")
    wait_for_resources(cluster)  # a placement group would wait forever, silently, for workers that cannot fit
    spec = job.train_spec()
    family = "preference" if job.stage in PREFERENCE_STAGES else "training"
    family = "task head" if job.stage in TASK_HEAD_STAGES else family
    for attempt in range(job.training.max_failures + 1):
        payload = {
            "run_dir": str(run_dir),
            "spec": spec.model_dump(mode="json"),
            "preference": job.preference_spec().model_dump(mode="json"),
            "faults": forwarded_faults(),
            "tracker_env": tracker_env(),  # for a Ray cluster this process did not start
        }
        clear_heartbeats(run_dir)
        set_status(
            run_dir, f"starting {cluster.workers} Ray worker(s)" + (f", attempt {attempt + 1}" if attempt else "")
        )
        try:
            run_spmd_workers(ENTRY_POINTS[family], payload, cluster, unused_packages(job))
            return
        except Exception as exc:
            reported = find_reported_error(exc)
            if reported is not None:
                raise reported from None
            failed = worker_failures(exc, run_dir, cluster.workers)
            if attempt == job.training.max_failures:
                raise TrainingFailed(
                    f"training failed: {failed}. The {attempt} restart(s) that training.max_failures allows are "
                    f"used up; all workers' logs are in {run_dir / 'logs'}. Run the job again to resume from its "
                    "newest complete checkpoint."
                ) from None
            log.warning("a worker was lost (%s); restarting from the newest complete checkpoint", failed)
            append_metrics(run_dir / "metrics.jsonl", {"event": "restart", "reason": failed, "time": time.time()})
            # this run's own newest checkpoint, whatever the job said
            spec = spec.model_copy(update={"output": spec.output.model_copy(update={"resume": "auto"})})


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
    if job.stage in PREFERENCE_STAGES:
        from tuneyard.rlhf.preference_recipe import run_preference_stage

        run_preference_stage(job.train_spec(use_deepspeed=False), job.preference_spec(), run_dir, rank=0)
    elif job.stage in TASK_HEAD_STAGES:
        from tuneyard.training.task_head_recipe import run_task_head

        run_task_head(job.train_spec(use_deepspeed=False), run_dir, rank=0)
    else:
        from tuneyard.training.causal_lm_recipe import run_training

        run_training(job.train_spec(use_deepspeed=False), run_dir, rank=0)


def task_head_figures(run_dir: Path) -> dict[str, tuple[float, float]]:
    """Eval accuracy (classify) and F1 (macro, or entity-level for token-classify), first and last evaluation."""
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
    if single and job.stage == "ppo":
        raise UserError("stage ppo runs its roles as Ray actors; --single is not supported for it (drop --single)")
    started = time.time()
    run_dir = prepare_run_dir(job.output, job_identity(job.identity_dump())).resolve()
    (run_dir / "job.yaml").write_text(dump_job(job))
    record_outcome(run_dir, "running", pid=os.getpid(), host=socket.gethostname(), started=started)
    try:
        figures = train_and_score(job, run_dir, show_progress, single)
    except BaseException as exc:
        status = {"Preempted": "preempted", "KeyboardInterrupt": "interrupted"}.get(type(exc).__name__, "failed")
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        record_outcome(run_dir, status, started=started, seconds=time.time() - started, message=message)
        raise
    record_outcome(run_dir, "finished", started=started, seconds=time.time() - started, figures=figures)
    return RunResult(run_dir=run_dir, seconds=time.time() - started, figures=figures)


def train_and_score(job: JobConfig, run_dir: Path, show_progress: bool, single: bool) -> dict[str, tuple]:
    """Check, train and publish final/ in `run_dir`; the before/after figures of the job's stage."""
    # A local Ray starts in the background while the driver checks the job (the CLI starts it sooner still);
    # the workers start only once the checks pass.
    ray_session = contextlib.nullcontext(lambda: None) if single else ray_starting(job.cluster, ray_cpus(job))
    with ray_session as wait_for_ray:
        preflight(job)
        check_world_size_of_resume(job, run_dir, single)
        check_disk(job, run_dir)
        start = starting_point(job)
        # The starting model does not change while the workers train, so it is scored after them: the first
        # step comes ~1.5 s sooner and the driver holds no model while the workers load theirs. A start inside
        # this run's folder (a final/ that this run replaces) is scored first.
        scored_first = start is not None and Path(start).resolve().is_relative_to(run_dir)
        before = stage_figures(job, start) if scored_first else None
        follow = ProgressFollower(run_dir / "metrics.jsonl", job.stage) if show_progress else contextlib.nullcontext()
        # the driver tokenises before any process group exists, so no rank waits in a barrier while another does
        tokenise = not single and job.stage in TOKENISED_STAGES
        streamed = tokenise and job.data.streaming  # tokenised by Ray tasks, so once Ray is up
        starting = "loading" if single else "starting Ray"
        set_status(run_dir, "tokenising the data (cached for later runs)" if tokenise and not streamed else starting)
        # the progress line comes first, so it shows what start-up is doing while the data and Ray get ready
        with follow:
            if tokenise and not streamed:  # outside the preemption watch: a stop now has nothing to save
                log.info("%s", prepare_data(job).summary())
                set_status(run_dir, starting)
            wait_for_ray()
            if single:
                with preemption_watch(run_dir):
                    run_single(job, run_dir)
            elif job.stage == "ppo":
                with preemption_watch(run_dir):
                    run_ppo_on_ray(job, run_dir)
            else:
                if streamed:  # an interrupted preparation keeps its finished shards for the rerun
                    log.info(
                        "%s", prepare_data(job, on_ray=True, report=lambda line: set_status(run_dir, line)).summary()
                    )
                with preemption_watch(run_dir):
                    run_on_ray(job, run_dir)
    figures = eval_loss_figure(run_dir)
    if job.stage in TASK_HEAD_STAGES:
        figures.update(task_head_figures(run_dir))
    after = stage_figures(job, final_folder(run_dir))
    before = stage_figures(job, start) if before is None else before
    figures.update({name: (before[name], after[name]) for name in before})
    return figures


def ray_cpus(job: JobConfig) -> float | None:
    """The CPUs a local Ray must offer for the job: PPO's role bundles; None (the workers' share) otherwise."""
    if job.stage != "ppo":
        return None
    from tuneyard.rlhf.ppo.groups import plan_placement, present_roles

    return plan_placement(job.ppo, present_roles(job.train_spec(), job.reward)).total("CPU")
