"""QLoRA memory: weight bytes of the 4-bit model against bf16 for the same architecture, and the
trainable-parameter share of LoRA r=8 and r=64 on it."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tuneyard.training.config import PeftSection
from tuneyard.training.finetune_method import apply_finetune_method, parameter_counts, quantization_config

# A 0.3B-parameter Llama shape: big enough that the linear layers dominate, small enough for CPU.
ARCH = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the weights of the transformer blocks' linear layers (4-bit or not)."""
    total = 0
    for name, module in model.named_modules():
        if ".layers." in name and hasattr(module, "weight") and module.weight is not None and module.weight.ndim == 2:
            weight = module.weight
            total += weight.numel() * weight.element_size()
            state = getattr(weight, "quant_state", None)
            if state is not None:  # per-block scales are part of the 4-bit cost
                total += state.absmax.numel() * state.absmax.element_size()
    return total


def main(work: Path) -> dict:
    """The bf16 -> 4-bit ratio of linear-layer weight memory and the LoRA trainable shares."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(dir=work if work.exists() else None) as tmp:
        torch.manual_seed(0)
        config = AutoConfig.for_model("llama", **ARCH)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
        bf16 = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
        bf16_bytes = linear_weight_bytes(bf16)
        del bf16
        shares = {}
        for r in (8, 64):
            peft = PeftSection(method="qlora", r=r, alpha=2 * r)
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quantization_config(peft))
            if r == 8:
                nf4_bytes = linear_weight_bytes(model)
            trainable, total = parameter_counts(apply_finetune_method(model, peft))
            shares[f"r{r}_trainable_share"] = trainable / total
            del model
    return {
        "bf16_linear_MiB": bf16_bytes / 2**20,
        "nf4_linear_MiB": nf4_bytes / 2**20,
        "ratio": nf4_bytes / bf16_bytes,
        "target": "<= 0.3x",
        **shares,
    }
