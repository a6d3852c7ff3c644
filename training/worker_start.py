"""The start of a training process on Ray: its output to the run's logs, its extension cache watched, the job's
faults and tracker settings applied. The SPMD recipes and PPO's role actors start this way."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tuneyard.training.deepspeed_config import import_deepspeed_without_mlflow
from tuneyard.training.faults import apply_faults
from tuneyard.training.run_dir import read_status, set_status
from tuneyard.training.tracking import apply_tracker_env

log = logging.getLogger(__name__)


def redirect_output(log_path: Path) -> None:
    """Send this process's stdout/stderr (Python and C++ alike) to a log file; the console shows progress."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log_path, "a", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def watch_start_up(run_dir: Path, who: str) -> None:
    """Key this worker's extension cache by its own build, and put any wait on a build lock on the progress line."""
    from tuneyard.cluster.extensions import use_own_build_folder, watch_extension_locks

    use_own_build_folder()
    before: list[str] = []

    def report(text: str) -> None:
        if text:
            before.append(before[-1] if before else read_status(run_dir))
            set_status(run_dir, f"{who}: {text}")
        elif before:
            set_status(run_dir, before[0])
            before.clear()

    watch_extension_locks(os.environ["TORCH_EXTENSIONS_DIR"], report)


def start_ray_worker(payload: dict, rank: int) -> Path:
    """In a Ray worker of the job's group: its run directory; the worker's output goes to RUN_DIR/logs."""
    import datasets
    import ray

    run_dir = Path(payload["run_dir"])
    apply_faults(payload.get("faults", {}))
    apply_tracker_env(payload.get("tracker_env", {}))
    if payload["spec"].get("deepspeed"):
        import_deepspeed_without_mlflow()
    redirect_output(run_dir / "logs" / f"worker-{rank}.log")
    watch_start_up(run_dir, f"rank {rank}")
    log.info("rank %d (pid %d) runs on Ray node %s", rank, os.getpid(), ray.get_runtime_context().get_node_id())
    datasets.disable_progress_bars()
    return run_dir
