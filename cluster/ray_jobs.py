"""A running Ray cluster's Jobs API: submit an entrypoint with its working_dir, then status, logs, stop.

The address is the cluster's dashboard (http://HEAD:8265), where the Jobs API listens. A cluster
started with token auth (Ray's default) gets the token from where Ray itself looks:
RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token. It travels in the
Authorization header of each request only; nothing here prints it or puts it in the job.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from tuneyard.cluster.ray_cluster import ClusterError, unreachable

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0


def find_auth_token() -> str | None:
    """The Ray auth token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (Ray's own order)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        if not Path(path).is_file():
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path} is not a file; point it at the file holding the token")
        return Path(path).read_text().strip() or None
    default = Path.home() / ".ray" / "auth_token"
    if not default.is_file():
        return None
    return default.read_text().strip() or None


def jobs_url(address: str | None) -> str:
    """The Jobs API base URL for an address given as http(s)://host:port or host:port."""
    address = (address or "").strip()
    if not address:
        raise ClusterError(
            "no Ray address: give --ray http://HEAD:8265 (the dashboard of the cluster), or set RAY_API_SERVER_ADDRESS"
        )
    if "://" not in address:
        address = "http://" + address
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https"):
        raise ClusterError(
            f"--ray {address}: the Jobs API needs the cluster's dashboard address, http://HEAD:8265, "
            f"not a '{parts.scheme}://' address"
        )
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ClusterError(f"--ray {address}: give host and port, e.g. http://10.0.0.1:8265")
    return f"{parts.scheme}://{parts.netloc}"


def _check_reachable(url: str) -> None:
    """Fail fast, and within seconds, when nothing listens at the address."""
    parts = urlsplit(url)
    why = unreachable(parts.hostname or "", parts.port or 0, CONNECT_TIMEOUT_S)
    if why:
        raise ClusterError(
            f"cannot reach the Ray cluster at --ray {url} ({why}); check that the cluster is up and that this is "
            "its dashboard address (http://HEAD:8265; the Jobs API is not on the GCS port 6379)"
        )


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """Ray's client prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over its argument; here the argument wins."""
    saved = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _client(address: str | None):
    """A JobSubmissionClient for the cluster, with bounded request times and the auth token."""
    from ray.job_submission import JobSubmissionClient

    class BoundedClient(JobSubmissionClient):
        """Every request gets a timeout: Ray's client would otherwise wait forever on a silent address."""

        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", (CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
            return super()._do_request(method, endpoint, **kwargs)

    url = jobs_url(address)
    _check_reachable(url)
    token = find_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with _explicit_address():
            return BoundedClient(url, headers=headers)
    except Exception as exc:
        raise _cluster_error(exc, url) from None


def _cluster_error(exc: Exception, url: str, job_id: str | None = None) -> ClusterError:
    """One paragraph for what went wrong talking to the Jobs API (the token never appears in it)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if type(exc).__name__ == "AuthenticationError" or "status code 401" in text or "status code 403" in text:
        return ClusterError(
            f"the Ray cluster at {url} refused the request: it needs its auth token. Set RAY_AUTH_TOKEN, or "
            "RAY_AUTH_TOKEN_PATH to a file holding it, or put it in ~/.ray/auth_token"
        )
    if job_id and ("does not exist" in text or "404" in text):
        return ClusterError(
            f"the Ray cluster at {url} has no job '{job_id}'; `ray job list --address {url}` lists its jobs"
        )
    if "Timeout" in type(exc).__name__ or "timed out" in text.lower():
        return ClusterError(f"the Ray cluster at {url} did not answer in time ({text}); is it the dashboard address?")
    return ClusterError(f"the Ray Jobs API at {url} failed: {text}")


def submit(
    address: str | None,
    entrypoint: str,
    working_dir: Path,
    submission_id: str,
    env_vars: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Upload `working_dir`, run `entrypoint` (a shell command) in it on the cluster; return the job id."""
    env_vars = dict(env_vars or {})
    if any(name.startswith("RAY_AUTH_TOKEN") for name in env_vars):
        raise ClusterError("the Ray auth token must not go into a job's runtime_env (anyone can read it there)")
    client = _client(address)
    url = jobs_url(address)
    runtime_env = {"working_dir": str(working_dir), "env_vars": env_vars}
    try:
        return client.submit_job(
            entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env, metadata=metadata or {}
        )
    except Exception as exc:
        raise _cluster_error(exc, url) from None


def details(address: str | None, job_id: str) -> dict:
    """A job's status, Ray's message on it, and its start/end times (epoch seconds; None until they happen)."""
    client = _client(address)
    try:
        info = client.get_job_info(job_id)
    except Exception as exc:
        raise _cluster_error(exc, jobs_url(address), job_id) from None
    return {
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message or "",
        "start_time": info.start_time / 1000 if info.start_time else None,
        "end_time": info.end_time / 1000 if info.end_time else None,
    }


def status(address: str | None, job_id: str) -> tuple[str, str]:
    """(status, message) of a job: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED, and Ray's words on it."""
    info = details(address, job_id)
    return info["status"], info["message"]


def logs(address: str | None, job_id: str) -> str:
    """Everything the job's entrypoint printed so far."""
    client = _client(address)
    try:
        return client.get_job_logs(job_id)
    except Exception as exc:
        raise _cluster_error(exc, jobs_url(address), job_id) from None


def follow_logs(address: str | None, job_id: str, poll_s: float = 2.0) -> Iterator[str]:
    """The job's output as it grows, until the job has ended."""
    shown = 0
    while True:
        state, _ = status(address, job_id)
        text = logs(address, job_id)
        if len(text) > shown:
            yield text[shown:]
            shown = len(text)
        if state in TERMINAL:
            return
        time.sleep(poll_s)


def stop(address: str | None, job_id: str, wait_s: float = 60.0) -> str:
    """Ask the job to stop (Ray sends SIGTERM, then SIGKILL) and wait for it to end; return its final status."""
    client = _client(address)
    try:
        client.stop_job(job_id)
    except Exception as exc:
        raise _cluster_error(exc, jobs_url(address), job_id) from None
    deadline = time.monotonic() + wait_s
    while True:
        state, _ = status(address, job_id)
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(1.0)
