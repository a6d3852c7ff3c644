"""Loading the tokenizer and the model: a hub id, a local folder, or a from-scratch architecture."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from training.attention import resolve_attn_implementation
from training.config import ModelConfig
from training.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def looks_like_local_path(name: str) -> bool:
    """A name that can only mean a folder on disk (hub ids are `org/name` or `name`)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or Path(name).exists()


def check_model_source(name: str, what: str = "model.name_or_path") -> None:
    """Fail clearly when a local model path does not exist or is not a model folder."""
    if not looks_like_local_path(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(
            f"{what}: '{name}' does not exist. Give an existing local folder (e.g. runs/pretrain-tiny/final) "
            "or a hub id such as 'org/model'."
        )
    if path.is_dir() and not (path / "config.json").exists() and what == "model.name_or_path":
        raise UserError(
            f"{what}: '{name}' is a folder but holds no config.json; point it at a Hugging Face model folder"
        )


def resolve_dtype(name: str) -> torch.dtype:
    """auto: bf16 on a CUDA device that supports it, fp32 otherwise."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of `model.tokenizer` or `model.name_or_path`, with a pad token."""
    name = cfg.tokenizer or cfg.name_or_path
    assert name is not None  # the config validator guarantees one of them
    check_model_source(name, "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise UserError(f"cannot load the tokenizer '{name}': {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    quantization: BitsAndBytesConfig | None = None,
    task: str = "causal-lm",
) -> PreTrainedModel:
    """Build (scratch) or load (pretrained, optionally 4-bit) a causal LM, or a one-output sequence
    classifier (`task="sequence-classification"`, a reward model), with the chosen attention and dtype."""
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    head = {} if task == "causal-lm" else {"num_labels": 1}
    attn = resolve_attn_implementation(cfg.attn_implementation, strict=cfg.strict_attention)
    dtype = resolve_dtype(cfg.dtype)
    if cfg.init == "scratch":
        if quantization is not None:
            raise UserError("a 4-bit model is loaded from saved weights; build the scratch model first")
        arch = dict(cfg.architecture or {})
        model_type = arch.pop("model_type")
        arch.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            arch.setdefault(key, getattr(tokenizer, key))
        config = AutoConfig.for_model(model_type, **arch, **head)
        model = auto.from_config(config, attn_implementation=attn, dtype=dtype)
    else:
        assert cfg.name_or_path is not None
        check_model_source(cfg.name_or_path)
        try:
            model = auto.from_pretrained(
                cfg.name_or_path,
                attn_implementation=attn,
                dtype=dtype,
                trust_remote_code=cfg.trust_remote_code,
                quantization_config=quantization,
                **head,
            )
        except OSError as exc:
            raise UserError(f"cannot load model '{cfg.name_or_path}': {exc}") from None
    if task != "causal-lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads the last non-pad token
    log.info("model: %s parameters, dtype %s, attention %s", f"{model.num_parameters():,}", dtype, attn)
    return model
