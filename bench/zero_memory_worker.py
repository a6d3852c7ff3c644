"""One rank of bench_zero_memory: build a Llama shape under a ZeRO stage, take one AdamW step, write what it holds.

torchrun --nproc-per-node 2 bench/zero_memory_worker.py STAGE OUT_DIR fp32|bf16
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

# fp32 and 0.1B parameters: model states (16 bytes a parameter, 1.6 GB) dwarf the few MB of activations
ARCH = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (each storage once): weights, gradients, optimizer
    state, ZeRO's partitions, flat buffers and buckets alike, however DeepSpeed arranges them."""
    import gc

    storages = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def main() -> None:
    """Measure this rank's memory before the model and after one training step."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    stage, out, precision = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    process = psutil.Process(os.getpid())
    before, tensors_before = process.memory_info().rss, live_tensor_bytes()
    hidden = ARCH["hidden_size"]
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # the bucket sizes transformers' "auto" gives (training/deepspeed_config.py), which the planner assumes
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden,
        },
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
    }
    torch.manual_seed(0)
    model_config = AutoConfig.for_model("llama", **ARCH)
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=stage == 3):  # ZeRO-3 shards as it builds
        model = AutoModelForCausalLM.from_config(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids = torch.randint(0, ARCH["vocab_size"], (1, 64))
    for step in range(2):  # measured at the second step's peak: AdamW's state exists and the gradients too
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        if step == 1:
            tensor_bytes, rss = live_tensor_bytes() - tensors_before, process.memory_info().rss - before
        engine.step()
    parameters = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.parameters())
    record = {
        "rank": rank,
        "stage": stage,
        "parameters": parameters,
        "precision": precision,
        "tensor_bytes": tensor_bytes,
        "rss_delta": rss,
    }
    (out / f"{precision}-stage{stage}-rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()


if __name__ == "__main__":
    main()
