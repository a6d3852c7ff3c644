"""Exporting a LoRA/QLoRA run: the adapter folder alone, or the adapter merged into its base weights."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from tuneyard.training.config import PROMPT_METHODS, PeftSection
from tuneyard.training.data.labels import HEAD_MODULES, STAGE_TASK
from tuneyard.training.errors import UserError
from tuneyard.training.model import check_model_source

if TYPE_CHECKING:  # torch, transformers and bitsandbytes load only to merge: a wrong path answers at once
    import torch

# labels.json: a task head's label names, which an adapter folder has no model config to hold
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "generation_config.json", "labels.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def _adapter_folder(run_dir: Path) -> Path:
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir} is not a folder; give a run directory (the output.dir of a finished job)")
    final = Path(run_dir) / "final"
    if not final.is_dir():
        raise UserError(f"{run_dir} has no final/ folder; export works on a finished run directory")
    if not (final / "adapter_config.json").exists():
        raise UserError(
            f"{final} holds full weights, not a LoRA adapter (the run's peft.method was full or freeze); "
            "it already loads with AutoModelForCausalLM.from_pretrained, nothing to export"
        )
    return final


def read_run_job(run_dir: Path) -> dict:
    """The run's job.yaml as a dict: its peft and model sections say how the base was loaded."""
    path = Path(run_dir) / "job.yaml"
    try:
        job = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; it is written when the run starts: give a run directory") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}); restore the run's job.yaml") from None
    if not isinstance(job, dict):
        raise UserError(f"{path} is not a job (a mapping of sections); restore the run's job.yaml")
    return job


def _run_peft_section(job: dict) -> PeftSection:
    return PeftSection(**(job.get("peft") or {}))


def _publish(staging: Path, out: Path, write: Callable[[Path], None]) -> None:
    """Write into a staging folder beside `out`, then swap it in; a place that cannot be written is the user's."""
    from tuneyard.training.run_dir import publish_final

    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write(staging)
        publish_final(staging, out)
    except OSError as exc:
        raise UserError(
            f"--out: cannot write the export to '{out}' ({exc.strerror}: '{exc.filename}'); give a folder path "
            "in a writable place"
        ) from None


def export_adapter(run_dir: Path, out: Path) -> Path:
    """Copy the PEFT adapter (config, safetensors weights) and the tokenizer into `out`."""
    final = _adapter_folder(run_dir)

    def write(staging: Path) -> None:
        for name in ADAPTER_FILES + TOKENIZER_FILES:
            if (final / name).exists():
                shutil.copy2(final / name, staging / name)

    _publish(out.with_name(out.name + ".staging"), out, write)
    return out


def load_dequantized_base(
    base_path: str, peft: PeftSection, allow_pickle: bool = False, task: str = "causal-lm", labels: list | None = None
) -> torch.nn.Module:
    """The base the adapter was trained on: for QLoRA the 4-bit weights, dequantised to the compute dtype.

    A task head's base (`task` other than causal-lm) is built with one output per name of `labels`.

    Merging into the original full-precision weights would give other logits than the trained QLoRA
    model (it never saw them), and merging into 4-bit weights would re-quantise the sum: both are wrong.
    """
    import torch
    from safetensors import SafetensorError

    from tuneyard.training.finetune_method import disable_cpu_inference_repacking, quantization_config
    from tuneyard.training.model import auto_model_class, label_maps

    auto = auto_model_class(task)
    head = {} if task == "causal-lm" else label_maps(labels)
    use_safetensors = None if allow_pickle else True  # as tuneyard.training.model.load_model loads it
    try:
        if peft.method != "qlora":
            return auto.from_pretrained(base_path, dtype=torch.float32, use_safetensors=use_safetensors, **head)
        quant = quantization_config(peft)
        if task != "causal-lm":  # the head trained in full, as tuneyard.training.task_head_recipe loaded it
            quant.llm_int8_skip_modules = list(HEAD_MODULES)
        quantized = auto.from_pretrained(base_path, quantization_config=quant, use_safetensors=use_safetensors, **head)
    except (OSError, SafetensorError) as exc:
        raise UserError(f"cannot load the adapter's base model '{base_path}': {exc}") from None
    disable_cpu_inference_repacking(quantized)
    return quantized.dequantize(dtype=quant.bnb_4bit_compute_dtype)


def load_adapter_model(run_dir: Path) -> torch.nn.Module:
    """A LoRA/QLoRA run's model as it trained: its (dequantised) base with the adapter from final/ applied."""
    final = _adapter_folder(run_dir)
    job = read_run_job(run_dir)
    peft = _run_peft_section(job)
    allow_pickle = bool((job.get("model") or {}).get("allow_pickle", False))
    adapter_config = final / "adapter_config.json"
    try:
        base_path = json.loads(adapter_config.read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(
            f"{adapter_config} is damaged (not JSON, or no base_model_name_or_path); restore it from a checkpoint"
        ) from None
    if not Path(base_path).exists() and base_path.startswith(("/", ".")):
        raise UserError(f"the adapter's base model '{base_path}' is gone; restore it to load the adapter")
    check_model_source(base_path, "the adapter's base model", allow_pickle=allow_pickle)
    from peft import PeftModel

    task = STAGE_TASK.get(job.get("stage"), "causal-lm")
    labels = None
    if task != "causal-lm":
        if not (final / "labels.json").is_file():
            raise UserError(f"{final} lacks labels.json (the label names of its head); restore it from the run")
        labels = json.loads((final / "labels.json").read_text())
    base = load_dequantized_base(base_path, peft, allow_pickle, task, labels)
    if (final / "generation_config.json").is_file():  # where the run's chat template ends a turn
        from transformers import GenerationConfig

        base.generation_config = GenerationConfig.from_pretrained(final)
    return PeftModel.from_pretrained(base, final)


def refuse_unmergeable(run_dir: Path) -> None:
    """Refuse to merge a prompt or prefix adapter: its virtual tokens change no weight of the base."""
    _adapter_folder(run_dir)
    method = _run_peft_section(read_run_job(run_dir)).method
    if method in PROMPT_METHODS:
        raise UserError(
            f"{run_dir} trained peft.method {method}: its learned virtual tokens go before every sequence and "
            "change no weight of the base, so there is nothing to merge into it; export the adapter with "
            f"`tuneyard export {run_dir} --adapter` (it loads with PEFT's PeftModel.from_pretrained on the base), "
            "or train with peft.method lora for a merged model"
        )


def export_merged(run_dir: Path, out: Path) -> Path:
    """Fold the adapter into its (dequantised) base and write a plain Hugging Face folder in safetensors."""
    from transformers import AutoTokenizer

    refuse_unmergeable(run_dir)
    merged = load_adapter_model(run_dir).merge_and_unload()
    final = Path(run_dir) / "final"

    def write(staging: Path) -> None:
        merged.save_pretrained(staging)
        AutoTokenizer.from_pretrained(final).save_pretrained(staging)

    _publish(out.with_name(out.name + ".staging"), out, write)
    return out
