"""Exporting a LoRA/QLoRA run: the adapter folder alone, or the adapter merged into its base weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.config import PeftSection
from training.errors import UserError
from training.finetune_method import disable_cpu_inference_repacking, quantization_config
from training.run_dir import publish_final

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def _adapter_folder(run_dir: Path) -> Path:
    final = Path(run_dir) / "final"
    if not final.is_dir():
        raise UserError(f"{run_dir} has no final/ folder; export works on a finished run directory")
    if not (final / "adapter_config.json").exists():
        raise UserError(
            f"{final} holds full weights, not a LoRA adapter (the run's peft.method was full or freeze); "
            "it already loads with AutoModelForCausalLM.from_pretrained, nothing to export"
        )
    return final


def _run_peft_section(run_dir: Path) -> PeftSection:
    job = yaml.safe_load((Path(run_dir) / "job.yaml").read_text())
    return PeftSection(**job.get("peft", {}))


def export_adapter(run_dir: Path, out: Path) -> Path:
    """Copy the PEFT adapter (config, safetensors weights) and the tokenizer into `out`."""
    final = _adapter_folder(run_dir)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ADAPTER_FILES + TOKENIZER_FILES:
        if (final / name).exists():
            shutil.copy2(final / name, staging / name)
    publish_final(staging, out)
    return out


def load_dequantized_base(base_path: str, peft: PeftSection) -> torch.nn.Module:
    """The base the adapter was trained on: for QLoRA the 4-bit weights, dequantised to the compute dtype.

    Merging into the original full-precision weights would give other logits than the trained QLoRA
    model (it never saw them), and merging into 4-bit weights would re-quantise the sum: both are wrong.
    """
    if peft.method != "qlora":
        return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    quant = quantization_config(peft)
    quantized = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quant)
    disable_cpu_inference_repacking(quantized)
    return quantized.dequantize(dtype=quant.bnb_4bit_compute_dtype)


def export_merged(run_dir: Path, out: Path) -> Path:
    """Fold the adapter into its (dequantised) base and write a plain Hugging Face folder in safetensors."""
    from peft import PeftModel

    final = _adapter_folder(run_dir)
    peft = _run_peft_section(run_dir)
    base_path = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    if not Path(base_path).exists() and base_path.startswith(("/", ".")):
        raise UserError(f"the adapter's base model '{base_path}' is gone; restore it to merge")
    base = load_dequantized_base(base_path, peft)
    merged = PeftModel.from_pretrained(base, final).merge_and_unload()
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    AutoTokenizer.from_pretrained(final).save_pretrained(staging)
    publish_final(staging, out)
    return out
