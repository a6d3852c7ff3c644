"""ZeRO memory: per-rank model-state bytes of 2-rank ZeRO-3 against ZeRO-0, measured, and the planner's figure.

Each side runs bench/zero_memory_worker.py under torchrun (2 ranks, gloo): a 71M-parameter Llama shape, two
AdamW steps, every live tensor's bytes counted at the second step's peak (weights, gradients, optimizer
state, ZeRO's partitions and buckets, however DeepSpeed arranges them). Theory for mixed precision: 16 bytes a
parameter on every rank under ZeRO-0, 16/2 under ZeRO-3, so 0.5. fp32 is reported beside it: there ZeRO-3
keeps an fp32 master partition beside the fp32 shard (10 bytes a parameter against 16: 0.63).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT
from bench.zero_memory_worker import ARCH
from tuneyard.launch.plan.memory import Setup, rank_memory, shape_of_config
from tuneyard.training.config import PeftSection


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(work: Path, stage: int, precision: str) -> dict:
    """Rank 0's record of one torchrun of the worker."""
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            str(ROOT / "bench" / "zero_memory_worker.py"),
            str(stage),
            str(work),
            precision,
        ],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return json.loads((work / f"{precision}-stage{stage}-rank0.json").read_text())


def planned_model_states(stage: int) -> float:
    """The planner's model-state bytes of one of 2 bf16 ranks for the worker's shape."""
    from transformers import AutoConfig

    shape = shape_of_config(AutoConfig.for_model("llama", **ARCH))
    setup = Setup(zero_stage=stage, world=2, precision="bf16", peft=PeftSection(), optim="adamw_torch", seq=64)
    return rank_memory(shape, setup).model_states


def main(work: Path) -> dict:
    """Measured ZeRO-3 / ZeRO-0 per-rank bytes (bf16 and fp32), and planned / measured for each."""
    measured = {f"{p}_zero{s}": measure(work / f"{p}-{s}", s, p) for p in ("bf16", "fp32") for s in (0, 3)}
    bytes_of = {name: record["tensor_bytes"] for name, record in measured.items()}
    planned = {f"bf16_zero{s}": planned_model_states(s) for s in (0, 3)}
    return {
        "tensor_bytes_per_rank": bytes_of,
        "parameters": measured["bf16_zero0"]["parameters"],
        "rss_delta_per_rank": {name: record["rss_delta"] for name, record in measured.items()},
        "fp32_ratio": bytes_of["fp32_zero3"] / bytes_of["fp32_zero0"],
        "planned_over_measured": {name: planned[name] / bytes_of[name] for name in planned},
        "ratio": bytes_of["bf16_zero3"] / bytes_of["bf16_zero0"],
        "target": "<= 0.55 (theory 0.5)",
        "note": "bf16, 2 ranks, live tensor bytes at the step's peak; fp32 in the JSON",
    }
