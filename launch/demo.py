"""`make demo`: continual pretraining then SFT of the tiny model on a local Ray, with before/after figures."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tuneyard.training.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"


def main() -> int:
    """Run pretrain-tiny.yaml then sft-tiny.yaml (fresh each time) and print what each learned."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress line says enough
    from tuneyard.cluster.ray_cluster import ray_cluster
    from tuneyard.launch.config import load_job
    from tuneyard.launch.run_job import run_job

    try:
        pretrain = load_job(CONFIGS / "pretrain-tiny.yaml", ["output.overwrite=true"])
        sft = load_job(CONFIGS / "sft-tiny.yaml", ["output.overwrite=true"])
        with ray_cluster(pretrain.cluster):
            results = [("pretrain", run_job(pretrain)), ("sft", run_job(sft))]
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n== what the demo learned ==")
    for stage, result in results:
        print(f"[{stage}] {result.figure()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
