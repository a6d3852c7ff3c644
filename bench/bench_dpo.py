"""DPO: samples/s with precomputed reference log-probs vs a live reference model (same job, side by side),
and the peak memory of LoRA-DPO vs full DPO on a model big enough for weights to dominate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from bench.common import ROOT, TOKENIZER, steady_rate

DATA = ROOT / "examples" / "data"
# ~85M parameters: full DPO holds policy, reference, gradients and Adam state; LoRA-DPO the base once
BIG_ARCH = {
    "model_type": "llama",
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
SMALL_ARCH = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def dpo_job(run_dir: Path, arch: dict, steps: int, **dpo: object) -> dict:
    """A from-scratch DPO job on the shipped pairs (single process; the comparisons need no cluster)."""
    return {
        "stage": "dpo",
        "model": {"init": "scratch", "tokenizer": str(TOKENIZER), "architecture": arch},
        "data": {"format": "preference", "train": str(DATA / "last-word-pref-train.jsonl"), "max_length": 64},
        "training": {"learning_rate": 1e-4, "batch_size": 8, "max_steps": steps, "seed": 1, "precision": "fp32"},
        "dpo": dpo,
        "peft": {"method": "full"},
        "output": {"dir": str(run_dir), "overwrite": True},
    }


def run_single(job: dict) -> int:
    """Run `tuneyard train --single` in a child process; its peak resident memory in bytes."""
    run_dir = Path(job["output"]["dir"])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    child = subprocess.Popen(
        [sys.executable, "-m", "tuneyard.launch.cli", "train", str(path), "--single"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"DPO bench run {run_dir} failed; see {run_dir / 'logs'}")
    return usage.ru_maxrss * 1024


def main(work: Path) -> dict:
    """Speed ratio (precomputed / live reference) and memory ratio (LoRA / full)."""
    rates: dict[str, list[float]] = {"precomputed": [], "live": []}
    for round_ in range(2):
        for name, precompute in (("precomputed", True), ("live", False)):
            run_dir = work / f"{name}-{round_}"
            run_single(dpo_job(run_dir, SMALL_ARCH, 40, precompute_ref_log_probs=precompute))
            rates[name].append(steady_rate(run_dir, "samples_per_s"))
    full = run_single(dpo_job(work / "mem-full", BIG_ARCH, 4))
    lora_job = dpo_job(work / "mem-lora", BIG_ARCH, 4)
    lora_job["peft"] = {"method": "lora", "r": 8, "alpha": 16}
    lora = run_single(lora_job)
    return {
        "samples_per_s": rates,
        "ratio": max(rates["precomputed"]) / max(rates["live"]),
        "target": "precomputed faster than live (> 1x)",
        "peak_rss_full_MiB": full / 2**20,
        "peak_rss_lora_MiB": lora / 2**20,
        "memory_ratio_lora_over_full": lora / full,
    }
