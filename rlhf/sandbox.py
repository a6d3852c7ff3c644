"""Tool calls in a separate process with limits: a wall-clock timeout, an address-space limit and a CPU-time limit
(`resource` rlimits), in a session of its own that is killed as a whole, with an environment of only PATH,
PYTHONPATH, HOME (a fresh temporary folder) and the locale: no inherited secrets.

What it does not isolate: the network and the filesystem (the tool runs as the job's user, and can read and write
what that user can), nor other processes of that user. For untrusted tools point `ppo.environment.sandbox.command`
at a real sandbox (a container or nsjail command line, the child's `python` appended), which then applies its own.

A tool that exceeds a limit, raises, or prints no result gives the model an error turn ("tool error: timed out after
2 s") and is counted; it never stops the run.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from tuneyard.rlhf.config import SandboxSection

RESULT_CHARS = 4000  # a tool's answer is cut here: it becomes prompt tokens of the next turn


@dataclass
class ToolOutcome:
    """A tool call's text for the model, and what went wrong (None: it answered)."""

    text: str
    error: str | None = None  # timeout | memory | cpu | raised | no_result


def function_path(function: Callable) -> str:
    """module:qualname, how the child imports the function."""
    return f"{function.__module__}:{function.__qualname__}"


def limited(limits: SandboxSection) -> Callable[[], None]:
    """The child's rlimits, set between fork and exec."""

    def apply() -> None:
        memory = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        cpu = max(1, int(limits.cpu_s + 0.999))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))

    return apply


def run_tool(function: Callable, arguments: dict, limits: SandboxSection) -> ToolOutcome:
    """Call `function(**arguments)` in a limited child process; its result as text, or the error turn's text."""
    with tempfile.TemporaryDirectory(prefix="tuneyard-tool-") as home:
        env = {
            "PATH": os.defpath,
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
            "HOME": home,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        command = [*limits.command, sys.executable, "-m", "tuneyard.rlhf.sandbox_child"]
        request = json.dumps({"function": function_path(function), "arguments": arguments})
        child = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=home,
            start_new_session=True,  # its own process group: whatever it starts is killed with it
            preexec_fn=limited(limits),
        )
        try:
            out, err = child.communicate(request.encode(), timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            return ToolOutcome(f"tool error: timed out after {limits.timeout_s:g} s", "timeout")
        finally:  # a finished tool's group may still hold what it started; a timed-out one is killed here
            kill_group(child)
    if child.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not out:
        return ToolOutcome(f"tool error: used up its {limits.cpu_s:g} s of CPU time", "cpu")
    try:
        answer = json.loads(out.decode(errors="replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        said = " ".join(err.decode(errors="replace").split())[-200:]
        ended = f"tool error: it ended without a result (exit {child.returncode}) {said}"
        return ToolOutcome(ended.strip(), "no_result")
    if answer.get("ok"):
        return ToolOutcome(str(answer["result"])[:RESULT_CHARS])
    kind = "memory" if answer.get("type") == "MemoryError" else "raised"
    if kind == "memory":
        return ToolOutcome(f"tool error: over its memory limit of {limits.memory_mb} MiB", kind)
    return ToolOutcome(f"tool error: {answer.get('type')}: {answer.get('error', '')}"[:RESULT_CHARS], kind)


def kill_group(child: subprocess.Popen) -> None:
    """End the child's whole process group (a finished child's group may still hold its children)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()
