"""The `peft` section applied to a model: full, freeze (top blocks only), or a PEFT adapter (LoRA, QLoRA, ...)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import BitsAndBytesConfig, PreTrainedModel, TrainerCallback

from tuneyard.training.config import PROMPT_METHODS, PeftSection
from tuneyard.training.errors import UserError
from tuneyard.training.model import full_numel, resolve_dtype

log = logging.getLogger(__name__)


# a projected prefix's whole encoder (embedding and MLP) in a one-process checkpoint, to resume from
PROMPT_ENCODER_FILE = "prompt_encoder.safetensors"

# PEFT's task type of each model task (tuneyard.training.model.load_model's `task`)
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS", "token-classification": "TOKEN_CLS"}

# IA3 scales the input of these (an MLP's last projection) instead of the output
FEEDFORWARD_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2")


def quantization_config(cfg: PeftSection, zero3: bool = False) -> BitsAndBytesConfig:
    """bitsandbytes 4-bit settings for a QLoRA base (NF4 or FP4, optional double quantisation).

    Under ZeRO-3 the packed 4-bit values are stored in the compute dtype's elements instead of uint8, so
    DeepSpeed partitions them like every other weight of that dtype (a model too big for one GPU).
    """
    compute = resolve_dtype(cfg.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute,
        **({"bnb_4bit_quant_storage": compute} if zero3 else {}),
    )


def zero3_shares(model: torch.nn.Module) -> str | None:
    """What share of the weights' elements ZeRO-3 keeps on this rank, the 4-bit base's apart; None without ZeRO-3."""
    held = whole = held_4bit = whole_4bit = 0
    for param in model.parameters():
        if not hasattr(param, "ds_numel"):
            continue
        held += param.ds_tensor.numel()
        whole += param.ds_numel
        if param.__class__.__name__ == "Params4bit":
            held_4bit += param.ds_tensor.numel()
            whole_4bit += param.ds_numel
    if not whole:
        return None
    line = f"ZeRO-3: this rank holds {held:,} of {whole:,} weight elements ({100 * held / whole:.1f}%)"
    if whole_4bit:
        line += f"; of the 4-bit base {held_4bit:,} of {whole_4bit:,} ({100 * held_4bit / whole_4bit:.1f}%)"
    return line


def transformer_blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's list of decoder blocks (model.layers, transformer.h, ...)."""
    paths = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers")
    encoders = ("bert.encoder.layer", "roberta.encoder.layer", "distilbert.transformer.layer", "encoder.layer")
    for path in paths + encoders:
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList):
            return node
    raise UserError(
        f"peft.method: freeze cannot find the transformer blocks of {type(model).__name__}; use lora or full"
    )


def freeze_all_but_top(model: PreTrainedModel, trainable_layers: int) -> None:
    """Train only the last `trainable_layers` blocks, the final norm and the output head (0: the head alone)."""
    blocks = transformer_blocks(model)
    if trainable_layers > len(blocks):
        raise UserError(f"peft.trainable_layers is {trainable_layers} but the model has {len(blocks)} blocks")
    for param in model.parameters():
        param.requires_grad_(False)
    top = list(blocks)[len(blocks) - trainable_layers :]
    # the LM head, or a classifier's: `score` (decoders, reward models) or `classifier` (BERT family)
    head = model.get_output_embeddings() or getattr(model, "score", None) or getattr(model, "classifier", None)
    # with no block training, the final norm stays as pretrained too: "head only" means the head alone
    norm = getattr(getattr(model, "model", model), "norm", None) if trainable_layers else None
    for module in [*top, head, norm, classifier_pooler(model)]:
        if module is not None:
            for param in module.parameters():
                param.requires_grad_(True)


def classifier_pooler(model: torch.nn.Module) -> torch.nn.Module | None:
    """BERT's pooler (dense + tanh over [CLS]), which feeds only its sequence classifier: part of the head, as
    RoBERTa's classification head holds its own dense layer. None for a model without one (decoders, taggers)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    pooler = getattr(base, "pooler", None)
    return pooler if isinstance(pooler, torch.nn.Module) else None


def lora_config(cfg: PeftSection, task: str = "causal-lm"):
    """The PEFT LoraConfig of the section (all linear layers unless target_modules says otherwise).

    A reward model's fresh `score` head is trained in full beside the adapter (it starts random).
    """
    from peft import LoraConfig

    classifier = task != "causal-lm"
    modules_to_save = cfg.modules_to_save or (["score"] if classifier else None)
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.rslora,
        use_dora=cfg.dora,
        modules_to_save=modules_to_save,
        task_type=TASK_TYPES[task],
    )


def prompt_learning_config(cfg: PeftSection, task_type: str, tokenizer_path: str | None = None):
    """PEFT's PromptTuningConfig or PrefixTuningConfig of the section: `num_virtual_tokens` learned tokens.

    Prompt tuning learns input embeddings (random, or the embeddings of `prompt_init_text` read with the
    tokenizer at `tokenizer_path`); prefix tuning learns every layer's keys and values, optionally through
    PEFT's two-layer MLP (`prefix_projection`).
    """
    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit

    if cfg.method == "prefix_tuning":
        return PrefixTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=cfg.prefix_projection, task_type=task_type
        )
    if cfg.prompt_init_text is None:
        return PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type=task_type)
    return PromptTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=cfg.prompt_init_text,
        tokenizer_name_or_path=tokenizer_path,
        task_type=task_type,
    )


def adapter_config(cfg: PeftSection, task: str = "causal-lm", total_steps: int = 0, tokenizer_path: str | None = None):
    """The PEFT config of the section's adapter: LoRA (QLoRA's too), AdaLoRA, IA3, prompt or prefix tuning.

    AdaLoRA starts every targeted layer at rank init_r and prunes to an average of r by importance, from
    10 % of `total_steps` until the last 20 %, which it trains at the final ranks. IA3 learns one scaling
    vector per targeted layer (PEFT's per-architecture defaults, or `target_modules`; those named like an
    MLP's down projection scale their input). Prompt and prefix tuning: see `prompt_learning_config`.
    """
    classifier = task != "causal-lm"
    task_type = TASK_TYPES[task]
    modules_to_save = cfg.modules_to_save or (["score"] if classifier else None)
    if cfg.method in PROMPT_METHODS:
        return prompt_learning_config(cfg, task_type, tokenizer_path)
    if cfg.method == "ia3":
        from peft import IA3Config

        targets = None if cfg.target_modules == "all-linear" else list(cfg.target_modules)
        feedforward = None if targets is None else [t for t in targets if t.split(".")[-1] in FEEDFORWARD_NAMES]
        return IA3Config(
            target_modules=targets,
            feedforward_modules=feedforward,
            modules_to_save=modules_to_save,
            task_type=task_type,
        )
    if cfg.method == "adalora":
        from peft import AdaLoraConfig

        return AdaLoraConfig(
            init_r=cfg.init_r or cfg.r + cfg.r // 2,
            target_r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            total_step=total_steps,
            tinit=total_steps // 10,
            tfinal=total_steps // 5,
            deltaT=max(1, total_steps // 50),
            modules_to_save=modules_to_save,
            task_type=task_type,
        )
    return lora_config(cfg, task)


def apply_finetune_method(
    model: PreTrainedModel,
    cfg: PeftSection,
    gradient_checkpointing: bool = False,
    task: str = "causal-lm",
    wrap_adapter: bool = True,
    total_steps: int = 0,
    tokenizer_path: str | None = None,
):
    """Freeze or wrap `model` as the section asks; returns the model to train (a PeftModel for an adapter).

    With `wrap_adapter=False` a LoRA/QLoRA base is only prepared, for a trainer that adds the adapter
    itself from `lora_config` (TRL's DPO then uses the base with the adapter disabled as reference).
    `total_steps` is AdaLoRA's schedule of rank pruning; `tokenizer_path` reads prompt tuning's `prompt_init_text`
    (default: the model's own folder).
    """
    if cfg.method == "full":
        return model
    if cfg.method == "freeze":
        freeze_all_but_top(model, cfg.trainable_layers)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        # casts norms to fp32, freezes the 4-bit base and enables input grads for checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        disable_cpu_inference_repacking(model)
    if not wrap_adapter:
        return model
    return get_peft_model(model, adapter_config(cfg, task, total_steps, tokenizer_path or model.name_or_path))


class SavesPromptAdapters:
    """Trainer mixin: prompt and prefix adapters save under ZeRO-3, and a projected prefix resumes in one process.

    PEFT saves prompt and prefix tuning by running the prompt encoder inside `save_pretrained`, which the trainer
    calls on rank 0 alone; ZeRO-3 has partitioned the encoder, so rank 0's all-gather would wait forever for
    the other ranks. Every rank reaches `save_model` (checkpoints and final/ alike): the tokens are computed
    there, all ranks joining the gather, and PEFT on rank 0 is handed the result.

    With `prefix_projection` PEFT saves only the prefix the MLP computes, which cannot be trained on from:
    without DeepSpeed (whose own checkpoint holds every weight) a checkpoint also keeps the whole encoder.
    """

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        with prompts_computed_on_every_rank(self.model):
            super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        encoder = projected_prefix_encoder(self.model)
        if encoder is not None and not self.is_deepspeed_enabled and self.args.should_save:
            from safetensors.torch import save_file

            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, folder / PROMPT_ENCODER_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        encoder = projected_prefix_encoder(model or self.model)
        saved = Path(resume_from_checkpoint) / PROMPT_ENCODER_FILE
        if encoder is None or not saved.is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        encoder.load_state_dict(load_file(saved))


def projected_prefix_encoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The prefix encoder of a PeftModel trained with prefix_projection (embedding and MLP), else None."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "prefix_projection", False):
        return None
    return model.prompt_encoder[model.active_adapter]


@contextmanager
def prompts_computed_on_every_rank(model: torch.nn.Module) -> Iterator[None]:
    """While open, a ZeRO-3-partitioned prompt-learning PeftModel saves the virtual tokens computed on entry."""
    config = getattr(model, "active_peft_config", None)
    encoder = model.prompt_encoder[model.active_adapter] if config is not None and config.is_prompt_learning else None
    if encoder is None or not any(hasattr(p, "ds_numel") for p in encoder.parameters()):
        yield
        return
    saved = model.get_prompt_embedding_to_save(model.active_adapter)  # a collective: every rank runs it
    model.get_prompt_embedding_to_save = lambda adapter_name: saved  # shadows the method for PEFT's save
    try:
        yield
    finally:
        del model.get_prompt_embedding_to_save


class AdaLoraRankBudget(TrainerCallback):
    """AdaLoRA scores each rank's importance from the gradients and prunes: PEFT's update_and_allocate must run
    after every optimizer step, before the gradients are cleared, which the trainer does not call by itself."""

    def on_optimizer_step(self, args, state, control, model=None, **kw) -> None:
        model.base_model.update_and_allocate(state.global_step)


def disable_cpu_inference_repacking(model: torch.nn.Module) -> None:
    """Stop bitsandbytes' CPU backend from repacking 4-bit weights for inference in eval mode.

    bitsandbytes 0.50 repacks a Linear4bit's weight for its AVX512-BF16 kernel the first time the module
    runs in eval mode without grad, and only unpacks it when saving. Training after an evaluation then
    goes through that kernel, which has no backward (the adapters below get no gradient), and
    `dequantize()` reads the repacked bytes as if unpacked (garbage weights).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def keep_adapters_in_fp32(model: torch.nn.Module) -> None:
    """Undo TRL's bf16 cast of QLoRA adapters when training computes in fp32.

    TRL stores QLoRA adapters in bf16 (the paper's choice, under bf16 autocast). Computing in fp32
    (e.g. on CPU), bf16 adapter weights round Adam's small updates away.
    """
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit packed weight counts its unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        count = full_numel(param)
        if getattr(param, "quant_state", None) is not None or param.__class__.__name__ == "Params4bit":
            count *= 2 * param.element_size()  # two 4-bit values per stored byte (uint8, or bf16/fp32 under ZeRO-3)
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def memory_footprint(model: torch.nn.Module) -> str:
    """Weights by storage dtype (bytes in memory) and the trainable share, one line each."""
    by_dtype: dict[str, int] = defaultdict(int)
    for param in model.parameters():
        name = "4-bit (uint8 packed)" if param.__class__.__name__ == "Params4bit" else str(param.dtype).split(".")[-1]
        by_dtype[name] += param.numel() * param.element_size()
    trainable, total = parameter_counts(model)
    lines = [f"weights: {', '.join(f'{k} {v / 2**20:,.2f} MiB' for k, v in sorted(by_dtype.items()))}"]
    lines.append(f"parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / max(total, 1):.2f}%)")
    return "\n".join(lines)
