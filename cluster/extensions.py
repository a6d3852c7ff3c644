"""The workers' torch extension cache: a folder per torch/DeepSpeed build, and stale build locks cleared before a run.

DeepSpeed JIT-builds small ops (the CPU shm comm op, CPU Adam) through `torch.utils.cpp_extension.load`, which
builds `<TORCH_EXTENSIONS_DIR>/<op>/` under a `torch.utils.file_baton.FileBaton` on `<op>/lock`. The baton
holds no PID and torch waits on it without a timeout (`cpp_extension.load` passes no `warn_after_seconds`
either), so a build killed mid-way leaves a lock that makes every later run hang at start.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ROOT = "~/.cache/tuneyard/torch_extensions"
STALE_AFTER_S = 600.0
# processes that build an extension: ninja and the compilers, linkers and assemblers it starts
BUILDERS = frozenset(
    {"ninja", "c++", "g++", "gcc", "cc", "cc1", "cc1plus", "clang", "clang++", "collect2", "ld", "as", "nvcc"}
    | {"cicc", "ptxas", "fatbinary", "nvlink", "hipcc", "clang-offload-bundler"}
)
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "fuse.sshfs", "9p")


def build_key() -> str:
    """The name of this environment's build: torch version, DeepSpeed version, CUDA/ROCm/CPU and Python."""
    import torch

    if torch.version.hip:
        accelerator = "rocm" + "".join(torch.version.hip.split(".")[:2])
    elif torch.version.cuda:
        accelerator = "cu" + torch.version.cuda.replace(".", "")
    else:
        accelerator = "cpu"
    try:  # the version without importing deepspeed, whose import probes accelerators
        deepspeed = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        deepspeed = "none"
    torch_version = torch.__version__.split("+")[0]  # "+cpu"/"+cu124" is said by the accelerator part
    # an extension module is built against one Python ABI too, so two venvs differing only there must not share
    key = f"torch-{torch_version}-ds-{deepspeed}-{accelerator}-py{sys.version_info.major}{sys.version_info.minor}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


def default_extensions_dir() -> str:
    """The cache folder of this environment's build under ~/.cache/tuneyard/torch_extensions."""
    return os.path.join(os.path.expanduser(CACHE_ROOT), build_key())


def extensions_dir() -> str:
    """The workers' TORCH_EXTENSIONS_DIR: the user's own when set, else this build's folder."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or default_extensions_dir()


def use_own_build_folder() -> None:
    """In a worker: key the default cache by the worker's own build, which may differ from the driver's.

    The driver marks a default cache with TUNEYARD_DEFAULT_EXTENSIONS_DIR; a user's own TORCH_EXTENSIONS_DIR
    is left alone.
    """
    if os.environ.get("TUNEYARD_DEFAULT_EXTENSIONS_DIR") == os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.environ["TUNEYARD_DEFAULT_EXTENSIONS_DIR"] = default_extensions_dir()


def filesystem_type(path: str | Path) -> str:
    """The type (ext4, nfs4, ...) of the filesystem holding `path`, from /proc/self/mounts; '' when unknown."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def _builder_holding(op_dir: str, lock: str) -> str | None:
    """A live local process that holds the build of `op_dir` ('pid (name)'), or None.

    A holder is a process with `lock` open (FileBaton keeps the descriptor of its O_EXCL create until it
    releases), or a builder (ninja, a compiler, linker or assembler) whose working directory is the op folder
    or whose arguments name it. Processes of other users cannot be inspected and do not count; the default
    cache lies in the user's home.
    """
    prefix = op_dir.rstrip("/") + "/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():  # this process counts too: a worker holds its own build's baton
            continue
        try:
            name = (entry / "comm").read_text().strip()
            args = [a for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            program = os.path.basename(args[0].decode(errors="replace")) if args else name
            if name in BUILDERS or program in BUILDERS:
                cwd = os.readlink(entry / "cwd")
                if cwd == op_dir or cwd.startswith(prefix) or any(op_dir.encode() in a for a in args[1:]):
                    return f"{entry.name} ({program})"
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == lock:
                    return f"{entry.name} ({program})"
        except OSError:  # gone meanwhile, or another user's
            continue
    return None


def clear_stale_locks(
    root: str | Path, stale_after_s: float = STALE_AFTER_S, only: set[Path] | None = None
) -> list[Path]:
    """Remove the `<root>/<op>/lock` files whose build died, with a warning each; return the removed paths.

    A lock is stale when no live process holds the build (see `_builder_holding`: a process with the lock
    open, or ninja/a compiler working in or on the op folder), or when it is older than `stale_after_s`
    whoever holds it (a build hung that long would hang the run as surely as a dead one). On a network
    filesystem (NFS, Lustre, ...) the holder may be on another machine, where this one cannot look, so
    there only the age counts. With `only`, locks outside it are removed for their age alone.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    network = filesystem_type(root) in NETWORK_FILESYSTEMS
    removed = []
    for lock in sorted(root.glob("*/lock")):
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # its build finished meanwhile
            continue
        op_dir = os.path.realpath(lock.parent)
        if age > stale_after_s:
            why = f"it is {age / 60:.0f} min old (over {stale_after_s / 60:g} min)"
        elif network or (only is not None and lock not in only):
            continue
        else:
            holder = _builder_holding(op_dir, os.path.join(op_dir, "lock"))
            if holder is not None:
                log.info("extension build lock %s is held by process %s; keeping it", lock, holder)
                continue
            why = "no live process holds its build"
        try:
            lock.unlink()
        except FileNotFoundError:
            continue
        removed.append(lock)
        log.warning(
            "removed the stale torch extension build lock %s (%s): torch would make every worker wait on it "
            "forever; the next build of that op redoes what is missing",
            lock,
            why,
        )
    return removed


def watch_extension_locks(
    root: str | Path, report: Callable[[str], None], every_s: float = 5.0, stale_after_s: float = STALE_AFTER_S
) -> threading.Event:
    """In a background thread: clear stale locks under `root` as they appear, and report the builds waited on.

    torch's FileBaton waits on a lock without bound; with this running, a lock whose build died goes
    within `every_s`, and one held longer than `stale_after_s` goes too. `report` gets one line per wait
    ("waiting for ...") and "" when no lock is left. Set the returned event to stop watching.
    """
    stop = threading.Event()
    root = Path(root)

    def unheld() -> set[Path]:
        locks = root.glob("*/lock") if root.is_dir() else []
        return {
            lock for lock in locks if _builder_holding(os.path.realpath(lock.parent), os.path.realpath(lock)) is None
        }

    def watch() -> None:
        waiting, suspects = False, set()
        while not stop.is_set():
            # unheld in two looks in a row: a baton between closing its file and removing it is not stale
            now_unheld = unheld()
            clear_stale_locks(root, stale_after_s, only=now_unheld & suspects)
            suspects = now_unheld
            locks = sorted(root.glob("*/lock")) if root.is_dir() else []
            if locks:
                lock = locks[0]
                holder = _builder_holding(os.path.realpath(lock.parent), os.path.realpath(lock)) or "an unknown process"
                try:
                    age = time.time() - lock.stat().st_mtime
                except FileNotFoundError:
                    continue
                report(
                    f"waiting for the build of torch extension '{lock.parent.name}' (lock {lock}, held by "
                    f"{holder}, {age:.0f} s; a lock held over {stale_after_s:.0f} s is removed)"
                )
                waiting = True
            elif waiting:
                report("")
                waiting = False
            stop.wait(every_s)

    threading.Thread(target=watch, name="extension-lock-watch", daemon=True).start()
    return stop
