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
import time
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
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
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


def clear_stale_locks(root: str | Path, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the `<root>/<op>/lock` files whose build died, with a warning each; return the removed paths.

    A lock is stale when no live process holds the build (see `_builder_holding`: a process with the lock
    open, or ninja/a compiler working in or on the op folder), or when it is older than `stale_after_s`
    whoever holds it (a build hung that long would hang the run as surely as a dead one). On a network
    filesystem (NFS, Lustre, ...) the holder may be on another machine, where this one cannot look, so
    there only the age counts.
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
        elif network:
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
