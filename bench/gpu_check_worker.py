"""The entry `make gpu-check` gives a job's Ray workers: the recipe's own entry, with what the rank ran on recorded.

`bench/gpu_check_checks.py` hands the worker group (`tuneyard.cluster.worker_group.run_spmd_workers`) this entry in
place of the stage's `ray_worker`, with the real entry in the payload. Each rank then writes, beside the run, the
process group's backend, the GPU it trained on and torch's peak memory there: the figures a check needs and the
recipe does not log. Everything else the rank does is the recipe's own code path.

Imported inside the Ray worker, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
from pathlib import Path

PAYLOAD_KEY = "gpu_check"  # payload[PAYLOAD_KEY] = {"entry": "module:function", "out": folder for the records}
ENTRY = "bench.gpu_check_worker:measured_entry"


def rank_record(rank: int) -> dict:
    """Where this rank runs: its process group's backend and size, and its GPU (none on CPU)."""
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    record: dict = {
        "rank": rank,
        "local_rank": local,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        torch.cuda.set_device(local)  # the rank's own GPU (the one it trains on): no context on another
        record["gpu"] = torch.cuda.get_device_name(local)
    return record


def peak_memory(record: dict) -> dict:
    """torch's peak allocated and reserved bytes on this rank's GPU, and the process's peak RSS."""
    import torch

    record["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = record["local_rank"]
        record["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        record["max_memory_reserved"] = torch.cuda.max_memory_reserved(device)
    return record


def measured_entry(payload: dict, rank: int) -> None:
    """Run the stage's entry for this rank, then write RANK's record (also when the entry raised)."""
    own = payload[PAYLOAD_KEY]
    out = Path(own["out"])
    out.mkdir(parents=True, exist_ok=True)
    record = rank_record(rank)  # the process group exists: the worker group joined it before calling us
    module, _, name = own["entry"].partition(":")
    entry = getattr(importlib.import_module(module), name)
    try:
        entry(payload, rank)
        record["finished"] = True
    except BaseException as exc:
        record["finished"] = False
        record["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        raise
    finally:
        (out / f"rank-{rank}.json").write_text(json.dumps(peak_memory(record)))


def measured_role_class(role_class: type, out: str) -> type:
    """`role_class` (a PPO role's actor class) that, once its `setup` has joined the role's process group and built
    its model, writes the rank's backend and GPU to OUT/ROLE-RANK.json; nothing else changes."""

    class MeasuredRole(role_class):
        def setup(self, *args, **kwargs):
            result = super().setup(*args, **kwargs)
            record = peak_memory({**rank_record(self.rank), "role": self.role, "finished": True})
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / f"{self.role}-{self.rank}.json").write_text(json.dumps(record))
            return result

    MeasuredRole.__name__ = role_class.__name__  # Ray names the actors after it; the qualname keeps it by value
    return MeasuredRole
