"""RL log-probs in chunks of response tokens against the whole logits: peak memory and time of the log-prob pass
(no grad: the policy's old log-probs and the reference's) and of the policy update's forward and backward.

A 2-layer Llama of hidden 256 with a 32k vocabulary answers 4 prompts with 1024 tokens each; each variant runs in
a process of its own and reports the rise of that process's peak resident memory (what the pass added, measured),
and the pass's seconds (the better of two runs)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB, SAMPLES, ANSWER, CHUNK = 32000, 4, 1024, 1024


def measure(chunk: int, phase: str) -> dict:
    """One variant in this process: {peak_MiB, seconds, checksum}."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneyard.rlhf.ppo.batches import build_samples, left_pad
    from tuneyard.rlhf.ppo.chunked_logprobs import ChunkedScorer
    from tuneyard.rlhf.ppo.roles import response_logprobs, response_tokens, sequence_forward

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=ANSWER + 64,
    )
    model = AutoModelForCausalLM.from_config(config).float()
    ids, mask = left_pad([list(range(3, 35))] * SAMPLES, 0)
    batch = build_samples(ids, mask, [torch.randint(3, VOCAB, (ANSWER,)).tolist() for _ in range(SAMPLES)], 0)
    scorer = ChunkedScorer(chunk, (0.7, 1.0))

    def run() -> float:
        if phase == "logprobs":
            model.eval()
            return response_logprobs(model, batch, SAMPLES, scorer, entropy=True)["logprobs"].sum().item()
        model.train()
        model.zero_grad()
        logprobs, entropy = scorer(model, partial(sequence_forward, model, batch), response_tokens(batch), True)
        (-(logprobs.mean()) - 0.01 * entropy.mean()).backward()
        return model.lm_head.weight.grad.norm().item()

    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, checksum = [], 0.0
    for _ in range(2):
        began = time.perf_counter()
        checksum = run()
        seconds.append(time.perf_counter() - began)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024
    return {"peak_MiB": peak, "seconds": min(seconds), "checksum": checksum}


def variant(chunk: int, phase: str) -> dict:
    """`measure` in a fresh process (a peak only ever rises within one)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_logprob_chunks", str(chunk), phase],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(work: Path) -> dict:
    """Peak-memory ratio of the update (chunked / whole), with the log-prob pass's and both time ratios as checks."""
    figures = {
        f"{phase}_{name}": variant(chunk, phase)
        for phase in ("logprobs", "update")
        for name, chunk in (("whole", 0), (f"chunk{CHUNK}", CHUNK))
    }
    whole, chunked = figures["update_whole"], figures[f"update_chunk{CHUNK}"]
    pass_whole, pass_chunked = figures["logprobs_whole"], figures[f"logprobs_chunk{CHUNK}"]
    return {
        "ratio": chunked["peak_MiB"] / whole["peak_MiB"],
        "target": "<= 0.25x",
        "note": f"update peak memory, chunks of {CHUNK} / whole logits, {SAMPLES} x {ANSWER} tokens, vocab {VOCAB}",
        "checks": [
            {
                "name": "log-prob pass peak memory",
                "ratio": pass_chunked["peak_MiB"] / pass_whole["peak_MiB"],
                "target": "<= 0.25x",
            },
            {"name": "update seconds", "ratio": chunked["seconds"] / whole["seconds"], "target": "<= 1.25x"},
            {
                "name": "log-prob pass seconds",
                "ratio": pass_chunked["seconds"] / pass_whole["seconds"],
                "target": "<= 1.1x",
            },
        ],
        **figures,
    }


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]), sys.argv[2])))
