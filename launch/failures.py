"""Reporting a failed run: the user's error, a cluster error or a training failure dug out of Ray's wrappers, the
failed workers named by rank, node, last line and log, and whether they were lost (restart) or raised (no restart)."""

from __future__ import annotations

from pathlib import Path

from tuneyard.cluster.ray_cluster import ClusterError
from tuneyard.training.errors import TrainingFailed, UserError
from tuneyard.training.run_dir import last_sign_of


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


# what a rank raises when its partner in a collective is gone or stalled (gloo, NCCL, the TCP store)
LOST_PARTNER_SIGNS = (
    "timed out",
    "timeout",
    "closed by peer",
    "reset by peer",
    "broken pipe",
    "connection refused",
    "communicator was aborted",
    "watchdog",
)
DIST_ERRORS = ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError")  # torch.distributed's own


def died(failure: BaseException) -> bool:
    """Whether a rank's failure is its process lost (killed worker, lost node, preemption, Ray's memory monitor)."""
    import ray.exceptions as ray_errors

    lost = (
        ray_errors.RayActorError,  # ActorDiedError, ActorUnavailableError
        ray_errors.WorkerCrashedError,
        ray_errors.NodeDiedError,
        ray_errors.LocalRayletDiedError,
        ray_errors.OutOfMemoryError,  # Ray's memory monitor killed the worker (torch's own OOM is raised, not this)
        ray_errors.ObjectLostError,
    )
    return isinstance(failure, lost) or "actor is dead" in str(failure)


def lost_partner(failure: BaseException) -> bool:
    """Whether a rank raised because a peer in its collective vanished or stalled, not for its own reasons."""
    if any(cls.__name__ in DIST_ERRORS for cls in type(failure).__mro__):
        return True
    text = str(failure).lower()
    return any(sign in text for sign in LOST_PARTNER_SIGNS)


def raised_by_training(exc: BaseException) -> bool:
    """Whether the failed ranks raised an error of the training code itself, which a restart would meet again.

    So: no rank died, and at least one raised an ordinary exception (ValueError, torch's OutOfMemoryError, a shape
    mismatch); peers that then lost it in a collective follow from that error. A dead rank, or only lost or
    stalled collectives, is a lost worker: restarting from the newest checkpoint may pass it.
    """
    failures = list((getattr(exc, "worker_failures", None) or {}).values())
    if not failures or any(died(failure) for failure in failures):
        return False
    return any(not lost_partner(failure) for failure in failures)


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
    lines = []
    for rank, failure in sorted(failures.items(), key=lambda item: (not died(item[1]), item[0])):
        log_path = run_dir / "logs" / f"worker-{rank}.log"
        node = ""
        if log_path.exists():
            started = [x for x in log_path.read_text(errors="replace").splitlines() if "runs on Ray node" in x]
            node = f" on node {started[-1].rsplit(' ', 1)[-1][:12]}" if started else ""
        said = _first_sentence(str(failure)) or type(failure).__name__
        if not died(failure) and not said.startswith(type(failure).__name__):  # "ValueError: ...": what it raised
            said = f"{type(failure).__name__}: {said}"
        lines.append(f"rank {rank}{node}: {said} (log: {log_path})")
    waited = [rank for rank, failure in failures.items() if "timed out" in str(failure).lower()]
    if waited:  # a collective timed out: the ranks that did not wait in it are the ones that never came
        for rank in sorted(set(range(workers)) - set(failures)):
            sign = last_sign_of(run_dir, rank)
            lines.append(
                f"rank {rank} did not arrive in the collective that rank(s) {', '.join(map(str, sorted(waited)))} "
                f"waited for" + (f" (its last sign: {sign})" if sign else "")
            )
    return "; ".join(lines)
