"""Packed SFT batches (TRL's BFD packing + padding-free collator) match per-example forward passes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tests.conftest import EXAMPLES, TINY_ARCH, TOKENIZER
from training.config import DataConfig, ModelConfig
from training.model import load_tokenizer
from training.packing import IGNORE_INDEX
from training.tokenize import build_datasets


@pytest.fixture(scope="module")
def examples():
    tokenizer = load_tokenizer(
        ModelConfig(init="scratch", architecture={"model_type": "llama"}, tokenizer=str(TOKENIZER))
    )
    cfg = DataConfig(format="messages", train=str(EXAMPLES / "data" / "last-word-eval.jsonl"), max_length=64)
    return tokenizer, build_datasets("sft", cfg, tokenizer, seed=0)["train"].select(range(12))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(examples, attn):
    tokenizer, dataset = examples
    arch = {k: v for k, v in TINY_ARCH.items() if k != "model_type"}
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), **arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()

    packed = pack_dataset(dataset.select_columns(["input_ids", "labels"]), seq_length=96, strategy="bfd")
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    seen = 0
    for row in packed:
        batch = collator([row])
        assert "attention_mask" not in batch  # packing relies on position ids alone
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        for lo, hi in zip(starts[:-1], starts[1:], strict=True):
            ids = batch["input_ids"][0, lo:hi]
            with torch.no_grad():
                alone = model(input_ids=ids[None], use_cache=False).logits[0]
            torch.testing.assert_close(logits[lo:hi], alone, atol=1e-5, rtol=1e-4)
            match = [i for i in range(len(dataset)) if dataset[i]["input_ids"] == ids.tolist()]
            assert match, "a packed segment must be one whole example"
            labels = batch["labels"][0, lo:hi].tolist()
            # the collator also masks each example's first token (no prediction across the boundary)
            assert labels[1:] == dataset[match[0]]["labels"][1:] and labels[0] == IGNORE_INDEX
            seen += 1
    assert seen == len(dataset)
    assert len(packed) < len(dataset)  # several examples share a row
