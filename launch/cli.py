"""The `tuneyard` command: train, validate, plot."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from training.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneyard", description="Train LLMs on Ray + DeepSpeed from one YAML job.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run a job (a local Ray on 127.0.0.1 unless cluster.address is set)")
    train.add_argument("job", help="job YAML file")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. training.max_steps=20")
    validate = commands.add_parser("validate", help="print the resolved job, or its errors")
    validate.add_argument("job")
    validate.add_argument("overrides", nargs="*")
    plot = commands.add_parser("plot", help="draw a run's metrics.jsonl into metrics.png")
    plot.add_argument("run_dir")
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    from launch.config import dump_job, load_job

    if args.command == "validate":
        print(dump_job(load_job(args.job, args.overrides)), end="")
        return 0
    if args.command == "plot":
        from training.metrics import plot_metrics

        run_dir = Path(args.run_dir)
        if not (run_dir / "metrics.jsonl").exists():
            raise UserError(f"{run_dir} has no metrics.jsonl; give a run directory (output.dir of a job)")
        print(plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png"))
        return 0
    from launch.run import run_job

    job = load_job(args.job, args.overrides)
    result = run_job(job)
    print(result.figure())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; a user's mistake is one paragraph on stderr and exit 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes warns at import that the optional `kernels` hub package is absent; we keep it out on purpose
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    args = _parser().parse_args(argv)
    from cluster.ray_cluster import ClusterError

    try:
        return _dispatch(args)
    except (UserError, ClusterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
