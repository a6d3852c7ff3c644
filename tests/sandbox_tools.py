"""Tools the sandbox and environment tests call in the sandbox's child process: a light module (no torch), so
the child imports it quickly under its memory limit."""

from __future__ import annotations

import os
import subprocess
import time

from tuneyard.rlhf.tools import tool


@tool
def sleep_forever(pid_file: str) -> str:
    """Start a grandchild, write both pids, and never return.

    Args:
        pid_file: where to write the pids
    """
    grandchild = subprocess.Popen(["sleep", "600"])
    with open(pid_file, "w") as out:
        out.write(f"{os.getpid()} {grandchild.pid}")
    time.sleep(600)
    return "woke"


@tool
def allocate(gib: int) -> str:
    """Allocate `gib` GiB and touch it.

    Args:
        gib: how many GiB
    """
    block = bytearray(gib * 2**30)
    return str(len(block))


@tool
def fail(message: str) -> str:
    """Raise ValueError.

    Args:
        message: its text
    """
    raise ValueError(message)


@tool
def spin(seconds: int) -> str:
    """Busy-loop on the CPU.

    Args:
        seconds: for how long
    """
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "spun"


@tool
def environment_names() -> str:
    """The names of the process's environment variables, and what it printed before answering."""
    print("printed text cannot forge the answer")
    return ",".join(sorted(os.environ))


@tool
def lookup(key: str) -> str:
    """The code stored under a key.

    Args:
        key: the key, e.g. "k7"
    """
    return {"k1": "ALPHA", "k2": "BRAVO"}.get(key, "no such key")
