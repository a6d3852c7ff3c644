"""The `tuneyard` command: train, validate, schema, prepare, plan, pipeline, runs, plot, chat, generate, export and
submit."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import sys
from pathlib import Path

from tuneyard.training.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneyard", description="Train LLMs on Ray + DeepSpeed from one YAML job.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run a job (a local Ray on 127.0.0.1 unless cluster.address is set)")
    train.add_argument("job", help="job YAML file")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. training.max_steps=20")
    train.add_argument(
        "--single", action="store_true", help="one process, no Ray or DeepSpeed: one GPU or a laptop, breakpoints work"
    )
    train.add_argument("--no-plan-check", action="store_true", help="start a GPU job the memory plan says won't fit")
    validate = commands.add_parser("validate", help="print the resolved job, or its errors")
    validate.add_argument("job")
    validate.add_argument("overrides", nargs="*")
    commands.add_parser("schema", help="print the job file's JSON Schema: tuneyard schema > tuneyard.schema.json")
    prepare = commands.add_parser("prepare", help="tokenise and pack a job's data into its cache ahead of the run")
    prepare.add_argument("job")
    prepare.add_argument("overrides", nargs="*")
    plan = commands.add_parser("plan", help="memory per GPU and per node for a job; changes that make it fit")
    plan.add_argument("job")
    plan.add_argument("overrides", nargs="*")
    plan.add_argument("--nodes", type=int, help="nodes (default: cluster.workers ranks on one node)")
    plan.add_argument("--gpus-per-node", type=int, help="GPUs per node: with --nodes, one rank per GPU")
    plan.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GiB (default cluster.gpu_memory)")
    plan.add_argument("--cpu-memory", help="memory of one node, e.g. 512GiB (default cluster.cpu_memory)")
    plan.add_argument("--architecture", help="the model's config.json (or its folder) when it is not on this disk")
    runs = commands.add_parser("runs", help="one row per run directory: stage, status, step, loss, before -> after")
    runs.add_argument("root", nargs="?", default="runs", help="the folder holding run directories (default runs/)")
    plot = commands.add_parser("plot", help="draw runs' metrics (loss and each stage's own figures) into a PNG")
    plot.add_argument("run_dirs", nargs="+", metavar="run_dir")
    plot.add_argument("--out", help="PNG path (default RUN_DIR/metrics.png for one run, runs.png for several)")
    chat = commands.add_parser("chat", help="talk to a finished run's model in the terminal (/reset, /exit)")
    chat.add_argument("run_dir")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7, help="0 answers greedily")
    chat.add_argument("--system", help="a system message that opens every conversation")
    generate = commands.add_parser("generate", help="answer a file of prompts with a finished run's model")
    generate.add_argument("run_dir")
    generate.add_argument("--prompts", required=True, help="JSONL/JSON/Parquet rows: messages, prompt or instruction")
    generate.add_argument("--out", required=True, help="JSONL: each prompt row with its response")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (the default) answers greedily")
    generate.add_argument("--seed", type=int, default=0)
    export = commands.add_parser("export", help="write a LoRA/QLoRA run's adapter, or the adapter merged into its base")
    export.add_argument("run_dir")
    what = export.add_mutually_exclusive_group(required=True)
    what.add_argument("--merge", action="store_true", help="a plain HF folder (QLoRA bases are dequantised first)")
    what.add_argument("--adapter", action="store_true", help="the PEFT adapter folder alone")
    export.add_argument("--out", help="destination folder (default RUN_DIR/export-merged or RUN_DIR/export-adapter)")
    pipeline = commands.add_parser("pipeline", help="run an ordered list of stage jobs, skipping finished ones")
    pipeline.add_argument("pipeline", help="pipeline YAML: stages: [{job: FILE, overrides: [...]}, ...]")
    pipeline.add_argument("--single", action="store_true", help="every stage in this process, without Ray")
    pipeline.add_argument("--force", action="store_true", help="run finished stages again too")
    from tuneyard.launch.submit import add_submit_commands

    add_submit_commands(commands)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    from tuneyard.cluster.ray_cluster import ray_starting
    from tuneyard.launch.config import dump_job, load_job
    from tuneyard.launch.submit import COMMANDS, run_submit_command
    from tuneyard.training.stages import stage_spec

    if args.command in COMMANDS:
        return run_submit_command(args)
    if args.command == "schema":
        from tuneyard.launch.schema import schema_text

        print(schema_text(), end="")
        return 0
    if args.command == "validate":
        print(dump_job(load_job(args.job, args.overrides)), end="")
        return 0
    if args.command == "prepare":
        from tuneyard.launch.prepare import prepare_data

        job = load_job(args.job, args.overrides)
        if not job.data.streaming:
            print(prepare_data(job).summary())
            return 0
        from tuneyard.cluster.ray_cluster import ray_cluster

        with ray_cluster(job.cluster):  # a streamed corpus is tokenised by tasks spread over the cluster
            print(
                prepare_data(job, on_ray=True, report=lambda line: print(line, file=sys.stderr, flush=True)).summary()
            )
        return 0
    if args.command == "plan":
        from tuneyard.launch.plan import hardware_from_args, print_plan

        job = load_job(args.job, args.overrides)
        return print_plan(job, hardware_from_args(args, job), args.architecture)
    if args.command == "runs":
        from tuneyard.launch.run_list import list_runs

        print(list_runs(Path(args.root)))
        return 0
    if args.command == "plot":
        run_dirs = [Path(d) for d in args.run_dirs]
        for run_dir in run_dirs:
            if not (run_dir / "metrics.jsonl").is_file():
                raise UserError(f"{run_dir} has no metrics.jsonl; give a run directory (output.dir of a job)")
        from tuneyard.training.metrics import plot_runs  # matplotlib: after the cheap checks

        out = Path(args.out) if args.out else (run_dirs[0] / "metrics.png" if len(run_dirs) == 1 else Path("runs.png"))
        labels = [d.name for d in run_dirs] if len({d.name for d in run_dirs}) == len(run_dirs) else args.run_dirs
        print(plot_runs([(label, d / "metrics.jsonl") for label, d in zip(labels, run_dirs, strict=True)], out))
        return 0
    if args.command in ("chat", "generate"):
        if args.max_new_tokens < 1 or args.temperature < 0:
            raise UserError("--max-new-tokens must be at least 1 and --temperature at least 0 (0 answers greedily)")
        from tuneyard.launch.inference import chat, generate_file

        if args.command == "chat":
            chat(Path(args.run_dir), args.max_new_tokens, args.temperature, args.system)
        else:
            count = generate_file(
                Path(args.run_dir), Path(args.prompts), Path(args.out), args.max_new_tokens, args.temperature, args.seed
            )
            print(f"{count} responses in {args.out}")
        return 0
    if args.command == "pipeline":
        from tuneyard.launch.pipeline import run_pipeline

        run_pipeline(Path(args.pipeline), single=args.single, force=args.force)
        return 0
    if args.command == "export":
        from tuneyard.launch.export import export_adapter, export_merged

        run_dir = Path(args.run_dir)
        out = Path(args.out) if args.out else run_dir / ("export-merged" if args.merge else "export-adapter")
        print((export_merged if args.merge else export_adapter)(run_dir, out))
        return 0
    job = load_job(
        args.job, args.overrides
    )  # before tuneyard.launch.run_job's imports (seconds), so a typo answers at once
    if not args.single and not args.no_plan_check:
        from tuneyard.launch.plan import check_job_memory

        check_job_memory(job)  # a GPU job that cannot fit is refused before Ray starts
    # A local Ray starts now, in the background, so its start-up overlaps run_job's imports instead of
    # following them. PPO's CPU count needs its planner's imports, so its Ray starts in run_job, beside the checks.
    early = not args.single and not stage_spec(job.stage).controller
    with ray_starting(job.cluster) if early else contextlib.nullcontext():
        from tuneyard.launch.run_job import run_job

        result = run_job(job, single=args.single)
    print(result.figure())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; a user's mistake is one paragraph on stderr and exit 2, an interrupt one
    line naming the phase it stopped and exit 130 (143 after SIGTERM)."""
    from tuneyard.training.interrupts import INTERRUPTED_EXIT_CODE, Terminated, answer_interrupts, current_phase

    answer_interrupts()
    # a crash of the driver prints Python's traceback (Ray's C++ handler is kept out of it); a stderr without a file
    # descriptor (main() called in-process under a capture) has nowhere to write it
    with contextlib.suppress(AttributeError, OSError, ValueError):
        faulthandler.enable()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes warns at import that the optional `kernels` hub package is absent; we keep it out on purpose
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    parser = _parser()
    # argparse stops collecting `overrides` at the first option; what follows it comes back as extras
    args, extras = parser.parse_known_args(argv)
    if extras and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extras)):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if extras:
        args.overrides += extras
    from tuneyard.cluster.ray_cluster import ClusterError

    try:
        if args.command in ("train", "export", "chat", "generate"):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # the "Loading weights" bars; our own progress line says enough
        return _dispatch(args)
    except (UserError, ClusterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(
            f"interrupted: {'SIGTERM' if terminated else 'SIGINT'} while {current_phase()}; Ray and the workers were "
            "stopped. Run the same command again to continue from the newest complete checkpoint "
            "(output.resume: auto)",
            file=sys.stderr,
        )
        return exc.exit_code if terminated else INTERRUPTED_EXIT_CODE
    except Exception as exc:
        # an outcome that is not a failure but has its own exit code (tuneyard.training.preemption.Preempted: 75)
        if getattr(exc, "exit_code", None) is None:
            raise
        print(str(exc), file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
