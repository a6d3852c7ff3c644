"""Tiny model folders for the tests of model loading: the shipped tokenizer and a 2-layer Llama, saved
as safetensors (what save_pretrained writes) or as pickles (what older tools and many hub repos hold)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import TINY_ARCH, TOKENIZER


def save_tiny_models(root: Path) -> dict[str, Path]:
    """causal (safetensors), pickle (the same weights as pytorch_model.bin), classifier-pickle (one output)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    arch = dict(TINY_ARCH)
    model_type = arch.pop("model_type")
    ids = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    torch.manual_seed(0)
    causal = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **arch, **ids)
    )
    classifier = AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model(model_type, vocab_size=len(tokenizer), num_labels=1, **arch, **ids)
    )
    folders = {name: root / name for name in ("causal", "pickle", "classifier-pickle")}
    causal.save_pretrained(folders["causal"])
    # transformers 5 writes safetensors only (no safe_serialization switch): a pickle folder is written by hand
    for name, model in (("pickle", causal), ("classifier-pickle", classifier)):
        folders[name].mkdir()
        model.config.architectures = [type(model).__name__]  # save_pretrained would record it
        model.config.save_pretrained(folders[name])
        torch.save(model.state_dict(), folders[name] / "pytorch_model.bin")
    for folder in folders.values():
        tokenizer.save_pretrained(folder)
    return folders
