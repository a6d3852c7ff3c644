"""Tokenisation cache: preparing the same job's data cold (empty cache) vs warm."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench.common import TOKENIZER
from tuneyard.training.config import DataConfig, ModelConfig
from tuneyard.training.data.tokenize import prepare_datasets
from tuneyard.training.model import load_tokenizer

DATA = TOKENIZER.parent.parent / "data"


def main(work: Path, repeats: int = 3) -> dict:
    """Seconds for cold and warm preparation of the pretrain and SFT example data, and their ratio."""
    tokenizer = load_tokenizer(
        ModelConfig(init="scratch", architecture={"model_type": "llama"}, tokenizer=str(TOKENIZER))
    )
    jobs = [
        (
            "pretrain",
            DataConfig(
                format="text", train=str(DATA / "corpus.txt"), eval=str(DATA / "corpus-eval.txt"), max_length=128
            ),
        ),
        (
            "sft",
            DataConfig(
                format="messages",
                train=str(DATA / "last-word-train.jsonl"),
                eval=str(DATA / "last-word-eval.jsonl"),
                max_length=256,
            ),
        ),
    ]
    cold, warm = [], []
    for _ in range(repeats):
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        started = time.perf_counter()
        for stage, cfg in jobs:
            assert not prepare_datasets(stage, cfg, tokenizer, 0, cache)[1]
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        for stage, cfg in jobs:
            assert prepare_datasets(stage, cfg, tokenizer, 0, cache)[1]
        warm.append(time.perf_counter() - started)
    return {"cold_s": cold, "warm_s": warm, "ratio": min(cold) / min(warm), "target": ">= 20x"}
