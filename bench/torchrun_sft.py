"""The baseline for bench_orchestration: the same TRL SFTTrainer and DeepSpeed dict under plain torchrun.

torchrun --nproc-per-node 2 bench/torchrun_sft.py JOB.yaml
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist

from tuneyard.launch.config import load_job
from tuneyard.training.causal_lm_recipe import run_training
from tuneyard.training.worker_start import redirect_output


def main() -> None:
    """Run one worker of the job without Ray: torchrun gives the rank and the rendezvous."""
    job = load_job(sys.argv[1])
    rank = int(os.environ["RANK"])
    redirect_output(Path(job.output.dir) / "logs" / f"torchrun-{rank}.log")
    dist.init_process_group("gloo")
    run_training(job.train_spec(), Path(job.output.dir), rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
