"""Reporting a failed run: the user's error, a cluster error or a training failure dug out of Ray's wrappers, and
the failed workers named by rank, node, last line and log."""

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
