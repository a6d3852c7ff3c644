"""Long sequences: Ulysses sequence parallelism on 2 CPU ranks (training.sequence_parallel 2) against one rank that
holds whole sequences, side by side in one run.

Each configuration runs the pretrain recipe itself (`training.causal_lm_recipe.run_training`: TRL's SFTTrainer,
DeepSpeed ZeRO-2, DeepSpeed's ALST) in processes of its own for a few steps of one row, on a small Llama (hidden
256, 4 layers: its activations, not its fixed costs, fill memory at these lengths). A rank's peak memory is the peak
resident memory of its process (what it measured, not an estimate); its activation peak is that minus the peak of
the same configuration at 512 tokens (the model, the optimizer, DeepSpeed and the data, which the length does not
change).

- ratio: the longest of the lengths tried that trains within the memory budget, 2 ranks sharing each sequence
  against one rank, both with whole MLPs; the budget is one rank's peak at the first length, so one rank reaches
  exactly that length.
- checks: the activation peak per rank at that first length (2 ranks / 1), and tokens per second of both; tiled
  MLPs (`training.tiled_mlp`) on one rank at that length against whole ones (activation peak, tokens/s); and the
  longest length within the budget for 2 ranks sharing each sequence with tiled MLPs.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASE_LENGTH = 512
LENGTHS = (8192, 12288, 16384)  # the first is one rank's budget
STEPS = 2


def job_dict(run_dir: Path, length: int, workers: int, sharing: int, tiled: bool) -> dict:
    """A pretrain job on the shipped corpus: rows of `length` tokens, one per step, fp32, ZeRO-2."""
    examples = ROOT / "examples"
    return {
        "stage": "pretrain",
        "model": {
            "init": "scratch",
            "tokenizer": str(examples / "tiny" / "tokenizer"),
            "architecture": {
                "model_type": "llama",
                "hidden_size": 256,
                "intermediate_size": 1024,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": length,
            },
            "attn_implementation": "sdpa",
        },
        "data": {
            "format": "text",
            "train": str(examples / "data" / "corpus.txt"),
            "max_length": length,
            "cache_dir": str(run_dir.parent / ".tokenized"),
        },
        "training": {
            "batch_size": 1,
            "max_steps": STEPS,
            "learning_rate": 1e-3,
            "sequence_parallel": sharing,
            "tiled_mlp": tiled,
            "report_to": [],
        },
        "cluster": {"workers": workers},
        "deepspeed": {"zero_stage": 2},
        "output": {"dir": str(run_dir), "save_steps": 0},
    }


def rank_main(rank: int, world: int, address: str, payload: dict, results: str) -> None:
    """One rank: join the group, run the recipe, write its peak memory."""
    import torch

    from tuneyard.cluster.worker_group import join_process_group
    from tuneyard.training.causal_lm_recipe import run_training
    from tuneyard.training.config import TrainSpec

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))  # the machine's cores shared by its ranks
    join_process_group(rank, world, rank, address, "gloo", 600)
    started = time.perf_counter()
    run_training(TrainSpec.model_validate(payload["spec"]), Path(payload["run_dir"]), rank)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(results, f"rank-{rank}.json").write_text(
        json.dumps({"peak_MiB": peak_kib / 1024, "seconds": time.perf_counter() - started})
    )


def measure(work: Path, length: int, workers: int, sharing: int, tiled: bool) -> dict:
    """Peak memory per rank (the largest) and tokens per second of one configuration."""
    import torch.multiprocessing as mp

    from tuneyard.cluster.worker_group import free_port
    from tuneyard.launch.config import job_from_dict
    from tuneyard.launch.prepare import prepare_data

    run_dir = work / f"len{length}-sp{sharing}{'-tiled' if tiled else ''}"
    run_dir.mkdir(parents=True, exist_ok=True)
    job = job_from_dict(job_dict(run_dir, length, workers, sharing, tiled))
    prepare_data(job)  # the tokenised cache, as `tuneyard train` builds it before the workers start
    results = run_dir / "ranks"
    results.mkdir(exist_ok=True)
    payload = {"spec": job.train_spec().model_dump(mode="json"), "run_dir": str(run_dir)}
    address = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    mp.start_processes(rank_main, args=(workers, address, payload, str(results)), nprocs=workers, start_method="spawn")
    ranks = [json.loads((results / f"rank-{r}.json").read_text()) for r in range(workers)]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["train_runtime"] for r in records if "train_runtime" in r]
    return {
        "peak_MiB": max(r["peak_MiB"] for r in ranks),
        "tokens_per_s": STEPS * length / seconds[-1] if seconds else float("nan"),
    }


def main(work: Path) -> dict:
    """The longest length within one rank's budget, 2 ranks sharing each sequence against 1 rank, and more."""
    work.mkdir(parents=True, exist_ok=True)
    figures = {}
    for sharing, tiled in ((1, False), (2, False), (1, True), (2, True)):
        lengths = (BASE_LENGTH, LENGTHS[0]) if sharing == 1 else (BASE_LENGTH, *LENGTHS)
        for length in lengths:
            key = f"sp{sharing}{'_tiled' if tiled else ''}_len{length}"
            figures[key] = measure(work, length, sharing, sharing, tiled)
            print(f"  {key}: {figures[key]}", flush=True)
    budget = figures[f"sp1_len{LENGTHS[0]}"]["peak_MiB"]

    def longest(config: str) -> int:
        return max((n for n in LENGTHS if figures[f"{config}_len{n}"]["peak_MiB"] <= budget), default=0)

    activation = {
        config: figures[f"{config}_len{LENGTHS[0]}"]["peak_MiB"] - figures[f"{config}_len{BASE_LENGTH}"]["peak_MiB"]
        for config in ("sp1", "sp2", "sp1_tiled")
    }
    return {
        "ratio": longest("sp2") / LENGTHS[0],
        "target": ">= 1.8x",
        "note": f"longest of {list(LENGTHS)} tokens within one rank's peak at {LENGTHS[0]} ({budget:.0f} MiB), "
        "2 ranks sharing each sequence / 1 rank (the ladder tops out at 2x)",
        "checks": [
            {
                "name": f"activation peak per rank at {LENGTHS[0]} tokens",
                "ratio": activation["sp2"] / activation["sp1"],
                "target": "<= 0.6x",
            },
            {
                "name": f"tokens/s at {LENGTHS[0]} tokens",
                "ratio": figures[f"sp2_len{LENGTHS[0]}"]["tokens_per_s"]
                / figures[f"sp1_len{LENGTHS[0]}"]["tokens_per_s"],
                "target": "as fast as it goes (2 ranks on 2 cores)",
            },
            {
                "name": f"tiled MLPs, one rank: activation peak at {LENGTHS[0]} tokens",
                "ratio": activation["sp1_tiled"] / activation["sp1"],
                "target": "lower",
            },
            {
                "name": f"tiled MLPs, one rank: tokens/s at {LENGTHS[0]} tokens",
                "ratio": figures[f"sp1_tiled_len{LENGTHS[0]}"]["tokens_per_s"]
                / figures[f"sp1_len{LENGTHS[0]}"]["tokens_per_s"],
                "target": "the price of one more MLP forward",
            },
            {
                "name": "2 ranks sharing each sequence with tiled MLPs: longest length within the budget / 1 rank",
                "ratio": longest("sp2_tiled") / LENGTHS[0],
                "target": ">= 1.8x",
            },
        ],
        "activation_MiB": activation,
        **figures,
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/bench-long-context")), indent=2))
