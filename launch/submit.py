"""`tuneyard submit | status | logs | stop`: a job sent to a Ray cluster (Jobs API) or to SLURM (sbatch).

Both paths validate the job here first, so a mistake in it is reported before anything is queued.
"""

from __future__ import annotations

import argparse
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tuneyard.cluster import ray_jobs, slurm
from tuneyard.launch.config import JobConfig, dump_job, load_job
from tuneyard.training.errors import UserError
from tuneyard.training.run_dir import job_identity, prepare_run_dir, run_lineage

COMMANDS = ("submit", "status", "logs", "stop")
# SLURM states in which a job will not run any more (squeue's long names)
SLURM_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _where(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--ray", metavar="ADDRESS", help="a Ray cluster's dashboard address, http://HEAD:8265")
    where.add_argument("--slurm", action="store_true", help="SLURM, through sbatch/scontrol/scancel")


def add_submit_commands(commands: argparse._SubParsersAction) -> None:
    """Register `submit`, `status`, `logs` and `stop` on the CLI's subcommands."""
    submit = commands.add_parser(
        "submit", help="send a job to a Ray cluster (--ray ADDRESS) or to SLURM (--slurm --nodes N)"
    )
    submit.add_argument("job", help="job YAML file")
    submit.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. training.max_steps=20")
    _where(submit)
    submit.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
    submit.add_argument("--no-plan-check", action="store_true", help="submit a GPU job the memory plan says won't fit")
    ray = submit.add_argument_group("Ray Jobs")
    ray.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="an environment variable")
    ray.add_argument("--submission-id", help="the job id to use (default tuneyard-NAME-RANDOM)")
    sl = submit.add_argument_group("SLURM")
    sl.add_argument("--nodes", type=int, help="nodes to allocate (Ray runs one node per SLURM node)")
    sl.add_argument("--gpus-per-node", type=int, default=0)
    sl.add_argument("--partition")
    sl.add_argument("--time", help="time limit, e.g. 4:00:00")
    sl.add_argument("--account")
    sl.add_argument("--job-name", help="default tuneyard-<output dir name>")
    sl.add_argument("--requeue", action="store_true", help="on a preemption warning: checkpoint, requeue, resume")
    sl.add_argument(
        "--preempt-warning", type=int, default=120, metavar="SECONDS", help="warning signal before the time limit"
    )
    sl.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more sbatch option, written --sbatch-arg=--qos=high",
    )
    sl.add_argument("--ray-wait", type=int, default=300, metavar="SECONDS", help="for all nodes to join Ray")
    sl.add_argument("--ray-port-base", type=int, help="first of Ray's ports (default derived from the job id)")
    sl.add_argument("--ray-tmp", default="/tmp", help="parent of each node's Ray temp dir")
    sl.add_argument("--ray-token-file", help="a file holding the Ray auth token (default: a new one per run)")
    helps = {"status": "a submitted job's state", "logs": "a submitted job's output", "stop": "stop a submitted job"}
    for name, text in helps.items():
        command = commands.add_parser(name, help=text)
        command.add_argument("job_id")
        _where(command)
        if name == "logs":
            command.add_argument("--follow", action="store_true", help="keep printing until the job ends")


def run_submit_command(args: argparse.Namespace) -> int:
    """Carry out `submit`, `status`, `logs` or `stop`; return the exit code."""
    if args.command == "submit":
        return _submit(args)
    if args.ray is not None:
        return _ray_command(args)
    return _slurm_command(args)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "job"


def _submit(args: argparse.Namespace) -> int:
    job = load_job(args.job, args.overrides)
    if not args.no_plan_check:
        from tuneyard.launch.plan import check_job_memory

        # before anything is queued or allocated; the cluster's `tuneyard train` checks again where it runs
        check_job_memory(job, nodes=args.nodes if args.ray is None else None, gpus_per_node=args.gpus_per_node or 0)
    if args.ray is not None:
        return _submit_ray(args, job)
    return _submit_slurm(args, job)


def _submit_ray(args: argparse.Namespace, job: JobConfig) -> int:
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item}: give KEY=VALUE")
        env[key] = value
    submission_id = args.submission_id or f"tuneyard-{_slug(Path(job.output.dir).name)}-{secrets.token_hex(4)}"
    # The driver runs inside the cluster: it joins the cluster the Jobs API started it in.
    job.cluster.address = "auto"
    entrypoint = "tuneyard train job.yaml" + (" --no-plan-check" if args.no_plan_check else "")
    staging = Path(tempfile.mkdtemp(prefix="tuneyard-submit-"))
    try:
        (staging / "job.yaml").write_text(dump_job(job))
        if args.dry_run:
            print(f"# Ray job {submission_id} at {args.ray}: working_dir holds job.yaml below; env {sorted(env)}")
            print(f"# entrypoint: {entrypoint}")
            print(dump_job(job), end="")
            return 0
        job_id = ray_jobs.submit(
            args.ray, entrypoint, staging, submission_id, env, metadata={"tuneyard_output_dir": str(job.output.dir)}
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    address = shlex.quote(args.ray)
    print(f"submitted Ray job {job_id}")
    print(f"  run dir: {job.output.dir}")
    print(f"  follow:  tuneyard logs {job_id} --ray {address} --follow")
    print(f"  stop:    tuneyard stop {job_id} --ray {address}")
    return 0


def _submit_slurm(args: argparse.Namespace, job: JobConfig) -> int:
    if args.nodes is None:
        raise UserError("--slurm needs --nodes N: how many nodes to allocate (Ray runs one node on each)")
    if job.cluster.placement == "strict_spread" and job.cluster.workers > args.nodes:
        raise UserError(
            f"cluster.workers={job.cluster.workers} with cluster.placement=strict_spread needs one node per worker, "
            f"but --nodes is {args.nodes}; ask for {job.cluster.workers} nodes or use placement pack/spread"
        )
    request = slurm.SlurmRequest(
        job=str(Path(args.job).resolve()),
        # an option after the overrides reaches `tuneyard train` on the head node like one (launch/cli.py main)
        overrides=list(args.overrides) + (["--no-plan-check"] if args.no_plan_check else []),
        nodes=args.nodes,
        job_name=args.job_name or f"tuneyard-{_slug(Path(job.output.dir).name)}",
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        time=args.time,
        account=args.account,
        requeue=args.requeue,
        preempt_warning_s=args.preempt_warning,
        ray_wait_s=args.ray_wait,
        ray_token_file=str(Path(args.ray_token_file).resolve()) if args.ray_token_file else None,
        ray_tmp=args.ray_tmp,
        port_base=args.ray_port_base,
        # SLURM's output beside the run's other logs, not in whatever folder `submit` was called from
        output=slurm.output_pattern(Path(job.output.dir) / "logs"),
        sbatch_args=list(args.sbatch_arg),
    )
    if args.dry_run:
        print("# " + shlex.join(request.sbatch_command()) + " < (this script)")
        print(slurm.render_script(request.variables()), end="")
        return 0
    request.sbatch_command()  # its input checks (--time, ...) before the run directory is touched
    _make_log_dir(job)
    job_id = slurm.submit(request)
    print(f"submitted SLURM job {job_id} ({args.nodes} node(s))")
    stuck = slurm.never_starts(job_id, request)
    if stuck:
        print(f"warning: {stuck} Cancel it with `tuneyard stop {job_id} --slurm`.", file=sys.stderr)
    print(f"  run dir: {job.output.dir}")
    print(f"  output:  {Path(job.output.dir) / 'logs' / f'slurm-{job_id}.out'}")
    print(f"  follow:  tuneyard logs {job_id} --slurm --follow")
    print(f"  stop:    tuneyard stop {job_id} --slurm")
    return 0


def _make_log_dir(job: JobConfig) -> None:
    """Create output.dir/logs, where sbatch writes the job's output: sbatch does not create the folder."""
    run_dir = Path(job.output.dir)
    try:
        if run_dir.exists() and any(run_dir.iterdir()):
            # an existing run (or other files) is for `tuneyard train` to adopt or refuse when the job starts
            (run_dir / "logs").mkdir(exist_ok=True)
        else:
            # a new run directory is claimed for this job as `tuneyard train` claims it (run.json), so that the
            # logs/ made now does not read as someone else's files there when the job starts
            dump = job.identity_dump()
            prepare_run_dir(job.output, job_identity(dump), run_lineage(dump))
    except OSError as exc:
        raise UserError(
            f"output.dir {run_dir}: cannot create its logs folder for SLURM's output ({exc.strerror or exc}); "
            "choose an output.dir you can write to, on a filesystem every node sees"
        ) from None


def _ray_command(args: argparse.Namespace) -> int:
    if args.command == "status":
        state, message = ray_jobs.status(args.ray, args.job_id)
        print(f"{args.job_id}  {state}" + (f"  {message}" if message else ""))
    elif args.command == "logs":
        if args.follow:
            for chunk in ray_jobs.follow_logs(args.ray, args.job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            sys.stdout.write(ray_jobs.logs(args.ray, args.job_id))
    else:
        print(f"{args.job_id}  {ray_jobs.stop(args.ray, args.job_id)}")
    return 0


def _slurm_command(args: argparse.Namespace) -> int:
    if args.command == "status":
        info = slurm.job_info(args.job_id)
        print(
            f"{args.job_id}  {info.get('JobState', '?')}  reason={info.get('Reason', '?')}  "
            f"nodes={info.get('NodeList', '?')}  restarts={info.get('Restarts', '0')}  log={info.get('StdOut', '?')}"
        )
    elif args.command == "logs":
        shown = 0
        while True:
            state = slurm.job_info(args.job_id).get("JobState", "")
            path = slurm.log_path(args.job_id)
            text = path.read_text(errors="replace") if path.exists() else ""
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
            if not args.follow or state in SLURM_ENDED:
                break
            time.sleep(2.0)
    else:
        slurm.stop(args.job_id)
        print(f"{args.job_id}  cancel requested")
    return 0
