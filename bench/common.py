"""Shared pieces of the benchmarks: the tiny SFT job, steady-state rates from metrics.jsonl."""

from __future__ import annotations

import statistics
from pathlib import Path

from tuneyard.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "examples" / "tiny" / "tokenizer"
ARCH = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


def sft_job(run_dir: Path, train: str, **data: object) -> dict:
    """A from-scratch SFT job dict on the tiny architecture, fp32, fixed length."""
    return {
        "stage": "sft",
        "model": {"init": "scratch", "tokenizer": str(TOKENIZER), "architecture": ARCH},
        "data": {
            "format": "messages",
            "train": train,
            "max_length": 256,
            "cache_dir": str(run_dir.parent / ".tok"),
            **data,
        },
        "training": {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 40, "seed": 1, "precision": "fp32"},
        "deepspeed": {"zero_stage": 2},
        "cluster": {"workers": 2},
        "output": {"dir": str(run_dir), "overwrite": True},
    }


def steady_rate(run_dir: Path, key: str, skip: int = 5) -> float:
    """Median of a per-step rate after the first `skip` steps (start-up and warm-up excluded)."""
    values = [r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if key in r and r["step"] > skip]
    if not values:
        raise RuntimeError(f"{run_dir} logged no '{key}' after step {skip}")
    return statistics.median(values)
