"""The `tuneyard` command run as forks of one warm process: each run is a process of its own that calls the CLI's
`main()` as `python -m tuneyard.launch.cli` does, without importing torch, transformers and datasets again (most of
a refused job's seconds). Tables of many short runs use it; a run's stdout, stderr and exit code are what the
command's would be."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The server: imports once, then forks a child per request line (argv, cwd, where to write stdout and stderr) and
# answers the child's exit code. It starts no thread before forking, so the children hold no lock a thread held.
SERVER = r"""
import atexit, json, os, signal, sys, time, traceback
import datasets, torch, transformers  # noqa: F401
import tuneyard.launch.preflight, tuneyard.launch.run_job  # noqa: F401
from tuneyard.launch import cli

def child(request):
    os.chdir(request["cwd"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the request pipe
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = ["tuneyard", *request["argv"]]
    try:
        code = cli.main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)

for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        child(request)
    deadline = time.monotonic() + request["timeout"]
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print(json.dumps({"timed_out": True}), flush=True)
    else:
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(done[1])}), flush=True)
"""


class ForkingCli:
    """One warm server process; `run` forks it into a fresh `tuneyard ARGV` run (one run at a time)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.outputs = Path(tempfile.mkdtemp(prefix="tuneyard-cli-forks-"))
        self.server = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def run(self, argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """`tuneyard ARGV` in `cwd`, as subprocess.run would report it (TimeoutExpired past `timeout`)."""
        out, err = self.outputs / "stdout", self.outputs / "stderr"
        request = {"argv": argv, "cwd": str(cwd), "stdout": str(out), "stderr": str(err), "timeout": timeout}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        answer = self.server.stdout.readline()
        if not answer:
            raise RuntimeError(f"the CLI fork server ended (exit {self.server.wait()})")
        reply = json.loads(answer)
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        out.unlink()
        err.unlink()
        if reply.get("timed_out"):
            raise subprocess.TimeoutExpired(["tuneyard", *argv], timeout, stdout, stderr)
        return subprocess.CompletedProcess(["tuneyard", *argv], reply["returncode"], stdout, stderr)

    def close(self) -> None:
        """End the server (its children have all been waited for)."""
        self.server.stdin.close()
        self.server.wait(timeout=30)
        shutil.rmtree(self.outputs, ignore_errors=True)
