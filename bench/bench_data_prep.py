"""Streamed corpus preparation (data.streaming): peak memory and time at 0.1, 0.4 and 1.6 GB, and 2 tasks vs 1.

The corpora are the shipped corpus's sentences in seeded random order (generated here, into the bench's
temporary folder). Memory is sampled every 0.1 s: the largest RSS of a Ray worker while it runs a
preparation task, and the driver's own.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import psutil

from bench.common import ROOT, TOKENIZER
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.prepare import prepare_data

SIZES_GB = (0.1, 0.4, 1.6)
SCALE = float(os.environ.get("BENCH_DATA_PREP_SCALE", "1"))  # <1 for a quick trial of the bench itself


def write_corpus(path: Path, size_bytes: int, seed: int = 0) -> None:
    """Lines of 8-20 sentences of the shipped corpus, in seeded random order, until `size_bytes`."""
    text = (ROOT / "examples" / "data" / "corpus.txt").read_text()
    sentences = [s.strip() + "." for s in text.replace("\n", " ").split(".") if s.strip()]
    rng, written = random.Random(seed), 0
    with open(path, "w") as f:
        while written < size_bytes:
            lines = [" ".join(rng.choices(sentences, k=rng.randint(8, 20))) for _ in range(2000)]
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block)


class PeakMemory:
    """The largest RSS of the preparation tasks' processes and of this (driver) process, sampled in a thread."""

    def __init__(self) -> None:
        self.task_mb = 0.0
        self.driver_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            self.driver_mb = max(self.driver_mb, me.memory_info().rss / 2**20)
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                if "prepare_shard" in " ".join(proc.info["cmdline"] or []) and proc.info["memory_info"]:
                    self.task_mb = max(self.task_mb, proc.info["memory_info"].rss / 2**20)
            time.sleep(0.1)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def prepare(corpus: Path, work: Path, workers: int) -> dict:
    """Prepare `corpus` from an empty cache with `workers` Ray tasks at once: seconds, tokens, peak memory."""
    job = job_from_dict(
        {
            "stage": "pretrain",
            "model": {"init": "scratch", "tokenizer": str(TOKENIZER), "architecture": {"model_type": "llama"}},
            "data": {
                "format": "text",
                "train": str(corpus),
                "max_length": 1024,
                "streaming": True,
                "shard_mb": 16 * SCALE,  # 24 tasks per 0.4 GB: near-whole rounds for 1 or 2 at once
                "prepare_workers": workers,
                "cache_dir": str(work / f"cache-{corpus.stem}-{workers}"),
            },
            "output": {"dir": str(work / "run")},
        }
    )
    with PeakMemory() as peak:
        started = time.perf_counter()
        prepared = prepare_data(job, on_ray=True, report=lambda line: None)
        seconds = time.perf_counter() - started
    tokens = prepared.rows["train"] * 1024
    return {
        "gb": corpus.stat().st_size / 1e9,
        "workers": workers,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(tokens / seconds),
        "task_peak_rss_mb": round(peak.task_mb),
        "driver_peak_rss_mb": round(peak.driver_mb),
    }


def main(work: Path) -> dict:
    """Peak RSS and time across the three sizes (2 tasks), and 2 tasks vs 1 on the 0.4 GB corpus."""
    work.mkdir(parents=True, exist_ok=True)
    corpora = []
    for size in SIZES_GB:
        corpus = work / f"corpus-{size}gb.txt"
        write_corpus(corpus, int(size * SCALE * 1e9))
        corpora.append(corpus)
    runs = [prepare(corpus, work, 2) for corpus in corpora]
    one = prepare(corpora[1], work, 1)
    two = prepare(corpora[1], work / "again", 2)  # beside the 1-task run, so both see the same machine
    smallest, largest = runs[0], runs[-1]
    rss_ratio = max(largest["task_peak_rss_mb"], 1) / max(smallest["task_peak_rss_mb"], 1)
    per_gb = [r["seconds"] / r["gb"] for r in runs]
    speedup = two["tokens_per_s"] / one["tokens_per_s"]
    return {
        "ratio": speedup,
        "target": ">= 1.6x tokens/s, 2 tasks vs 1",
        "note": (
            f"task peak RSS {smallest['task_peak_rss_mb']} -> {largest['task_peak_rss_mb']} MB "
            f"(x{rss_ratio:.2f}, target <= 1.3); s/GB {per_gb[0]:.0f}, {per_gb[1]:.0f}, {per_gb[2]:.0f}"
        ),
        "checks": [
            {"name": "peak RSS, 1.6 GB / 0.1 GB", "ratio": rss_ratio, "target": "<= 1.3x"},
            {"name": "s per GB, 1.6 GB / 0.4 GB", "ratio": per_gb[2] / per_gb[1], "target": "<= 1.2x (linear)"},
        ],
        "runs": runs,
        "one_task": one,
        "two_tasks": two,
    }
