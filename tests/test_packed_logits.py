"""Packed SFT rows give each example the logits it gets alone, with labels off the prompt tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tests.conftest import EXAMPLES, TINY_ARCH, TOKENIZER
from tuneyard.training.config import DataConfig, ModelConfig
from tuneyard.training.data.packing import IGNORE_INDEX, PackedRowsCollator
from tuneyard.training.data.tokenize import build_datasets
from tuneyard.training.model import load_tokenizer


@pytest.fixture(scope="module")
def data():
    tokenizer = load_tokenizer(
        ModelConfig(init="scratch", architecture={"model_type": "llama"}, tokenizer=str(TOKENIZER))
    )
    cfg = DataConfig(format="messages", train=str(EXAMPLES / "data" / "last-word-eval.jsonl"), max_length=96)
    packed = build_datasets("sft", cfg, tokenizer, seed=0)["train"]
    unpacked = build_datasets("sft", cfg.model_copy(update={"packing": False}), tokenizer, seed=0)["train"]
    return tokenizer, packed, unpacked


def segments(batch: dict) -> list[tuple[int, int, int]]:
    """(row, start, end) of every example in a collated batch, from where position ids restart."""
    out = []
    for row, positions in enumerate(batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        out.extend((row, lo, hi) for lo, hi in zip(starts[:-1], starts[1:], strict=True))
    return out


@pytest.mark.parametrize(("layout", "attn"), [("rows", "sdpa"), ("rows", "eager"), ("flat", "sdpa")])
def test_packed_logits_equal_unpacked(data, layout, attn):
    tokenizer, packed, unpacked = data
    arch = {k: v for k, v in TINY_ARCH.items() if k != "model_type"}
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), **arch)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    if layout == "rows":
        collate = PackedRowsCollator(pad_token_id=tokenizer.pad_token_id)
    else:  # the flash-attn layout: the whole batch flattened into one varlen row
        collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    by_ids = {tuple(row["input_ids"]): row["labels"] for row in unpacked}
    assert len(packed) < len(unpacked) // 3  # several examples share each row

    seen = 0
    for start in range(0, len(packed), 4):
        batch = collate([packed[i] for i in range(start, min(start + 4, len(packed)))])
        assert "attention_mask" not in batch  # no attention across examples comes from position ids alone
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for row, lo, hi in segments(batch):
            ids = batch["input_ids"][row, lo:hi]
            if tuple(ids.tolist()) not in by_ids:  # the padded tail of a row
                assert (batch["labels"][row, lo:hi] == IGNORE_INDEX).all()
                continue
            with torch.no_grad():
                alone = model(input_ids=ids[None], use_cache=False).logits[0]
            torch.testing.assert_close(logits[row, lo:hi], alone, atol=2e-5, rtol=1e-4)
            labels = batch["labels"][row, lo:hi].tolist()
            # labels are the example's own (-100 off the assistant turn), first token masked at the boundary
            assert labels[0] == IGNORE_INDEX and labels[1:] == by_ids[tuple(ids.tolist())][1:]
            seen += 1
    assert seen == len(unpacked)
