"""Packing: non-pad tokens/s of padding-free packed SFT vs padded batches on a length-skewed set."""

from __future__ import annotations

import json
import random
from pathlib import Path

from bench.common import sft_job, steady_rate
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.run_job import run_job

WORDS = ["red", "fox", "owl", "river", "stone", "bread", "hill", "cloud", "lamp", "road"]


def skewed_chat_data(path: Path, rows: int = 1500, seed: int = 0) -> str:
    """Mostly short conversations and a tail of long ones: 85% ~10 tokens, 15% ~150-220 tokens."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            n = rng.randint(60, 90) if rng.random() < 0.15 else rng.randint(2, 4)
            words = [rng.choice(WORDS) for _ in range(n)]
            messages = [
                {"role": "user", "content": "Say the last word: " + " ".join(words)},
                {"role": "assistant", "content": words[-1]},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


def main(work: Path) -> dict:
    """tokens/s (non-padding) with packing on and off, same job otherwise, on the local Ray."""
    work.mkdir(parents=True, exist_ok=True)
    data = skewed_chat_data(work / "skewed.jsonl")
    rates = {}
    for round_, packing in enumerate((True, False, True, False)):
        name = "packed" if packing else "padded"
        run_dir = work / f"{name}-{round_}"
        job = sft_job(run_dir, data, packing=packing)
        job["training"]["max_steps"] = 30
        run_job(job_from_dict(job), show_progress=False)
        rates.setdefault(name, []).append(steady_rate(run_dir, "tokens_per_s"))
    best = {k: max(v) for k, v in rates.items()}
    return {"tokens_per_s": rates, "ratio": best["packed"] / best["padded"], "target": ">= 2x"}
