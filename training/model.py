"""Loading the tokenizer and the model: a hub id, a local folder, or a from-scratch architecture."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tuneyard.training.config import ModelConfig
from tuneyard.training.errors import UserError

if TYPE_CHECKING:  # torch and transformers load lazily, so `tuneyard validate` answers in a fraction of a second
    import torch
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # names of torch dtypes
# files from_pretrained would unpickle; training_args.bin, optimizer.pt and rng_state.pth of a checkpoint
# folder are not weights (from_pretrained never reads them), so only these names count
PICKLE_WEIGHT_PATTERNS = ("pytorch_model*.bin", "model*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"}


def looks_like_local_path(name: str) -> bool:
    """A name that can only mean a folder on disk (hub ids are `org/name` or `name`)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or Path(name).exists()


def pickle_weight_files(folder: Path) -> list[Path]:
    """The files in `folder` that hold weights as pickles (.bin, .pt, .pth, .pkl, .ckpt)."""
    found = {p for pattern in PICKLE_WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return sorted(p for p in found if p.name not in NOT_WEIGHTS and not p.name.startswith("rng_state"))


def _safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file cannot be loaded (cut short, damaged header), or None when it looks whole.

    Reads only the header and compares the size it promises with the file's: cheap for any model size.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"it is {size} bytes, shorter than a safetensors header"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"its header claims {length} bytes but the file has {size}: it was cut short"
        try:
            header = json.loads(f.read(length))
            ends = [t["data_offsets"][1] for key, t in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not valid safetensors metadata"
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        return f"its tensors need {needed} bytes but the file has {size}: it was cut short"
    return None


def _check_model_folder(path: Path, what: str, allow_pickle: bool | None) -> None:
    """config.json parses, safetensors files are whole, and pickle-only weights are allowed explicitly."""
    config_file = path / "config.json"
    if not config_file.is_file():
        if (path / "adapter_config.json").is_file():
            raise UserError(
                f"{what}: '{path}' is a LoRA adapter folder (adapter_config.json, no config.json); merge it into its "
                "base first with `tuneyard export RUN_DIR --merge` and point at the merged folder"
            )
        raise UserError(
            f"{what}: '{path}' is a folder but holds no config.json; point it at a Hugging Face model folder"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{what}: {config_file} is not UTF-8 text; the folder's config.json is damaged") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{what}: {config_file}:{exc.lineno}: not valid JSON ({exc.msg}); the model folder's config.json is "
            "damaged: save the model again (save_pretrained) or download it again"
        ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(
            f"{what}: {config_file} has no 'model_type', so transformers cannot tell the architecture; "
            "save the model again with save_pretrained"
        )
    safetensors = sorted(path.glob("*.safetensors"))
    for file in safetensors:
        problem = _safetensors_problem(file)
        if problem:
            raise UserError(
                f"{what}: {file} is damaged ({problem}). Copy or download the model again; "
                "a save that was interrupted leaves such a file"
            )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{what}: {index} is not a valid safetensors index (a JSON weight_map)") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise UserError(f"{what}: '{path}' lacks the weight shards {', '.join(missing)} that {index.name} names")
    if safetensors:
        return
    pickles = pickle_weight_files(path)
    if not pickles:
        raise UserError(
            f"{what}: '{path}' holds config.json but no weights (model.safetensors or model-*.safetensors); "
            "copy the weight files into it"
        )
    if allow_pickle is False:
        raise UserError(
            f"{what}: '{path}' holds its weights only as pickle files ({', '.join(p.name for p in pickles[:3])}), "
            "and unpickling can run code hidden in a file. Convert them to safetensors (load the model once "
            "where you trust it and save_pretrained the folder), or, if you trust these files, set "
            "model.allow_pickle: true."
        )


def check_model_source(
    name: str, what: str = "model.name_or_path", allow_pickle: bool | None = None, tokenizer_only: bool = False
) -> None:
    """Fail clearly when a local model path does not exist, is not a model folder, or its files are damaged.

    `allow_pickle` False refuses a folder whose weights are pickles only; None leaves that to the loader,
    which knows model.allow_pickle. `tokenizer_only` (or what="model.tokenizer") checks the path alone.
    """
    if not looks_like_local_path(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(
            f"{what}: '{name}' does not exist. Give an existing local folder (e.g. runs/pretrain-tiny/final) "
            "or a hub id such as 'org/model'."
        )
    if not path.is_dir():
        raise UserError(f"{what}: '{name}' is a file; give the folder that holds it (a Hugging Face model folder)")
    if not (tokenizer_only or what == "model.tokenizer"):
        _check_model_folder(path, what, allow_pickle)


def resolve_dtype(name: str) -> torch.dtype:
    """auto: bf16 on a CUDA device that supports it, fp32 otherwise."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, DTYPES[name])


def resolved_precision(precision: str) -> str:
    """The precision a run trains in: `auto` is bf16 on a CUDA device that supports it, fp32 otherwise."""
    import torch

    if precision != "auto":
        return precision
    return "bf16" if resolve_dtype("auto") == torch.bfloat16 else "fp32"


def load_tokenizer(cfg: ModelConfig, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of `model.tokenizer` or `model.name_or_path`, with a pad token and data.chat_template."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name_or_path
    assert name is not None  # the config validator guarantees one of them
    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    check_model_source(name, key, tokenizer_only=True)  # the weights are load_model's to judge
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        # no tokenizer files: ValueError ("Couldn't instantiate the backend"); a damaged JSON: JSONDecodeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{key}: cannot load a tokenizer from '{name}' ({type(exc).__name__}: {first}); the folder needs "
            "tokenizer.json (or the slow tokenizer's files) and tokenizer_config.json, e.g. from "
            "tokenizer.save_pretrained"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        from tuneyard.training.data.chat_templates import use_chat_template

        use_chat_template(tokenizer, chat_template)
    return tokenizer


def load_model(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    quantization: BitsAndBytesConfig | None = None,
    task: str = "causal-lm",
    labels: list[str] | None = None,
) -> PreTrainedModel:
    """Build (scratch) or load (pretrained, optionally 4-bit) a causal LM, or a one-output sequence
    classifier (`task="sequence-classification"`, a reward model), with the chosen attention and dtype.

    With `labels` a sequence or token classifier ("token-classification") gets one output per label, named.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig

    from tuneyard.training.attention import resolve_attn_implementation

    auto = auto_model_class(task)
    head = {} if task == "causal-lm" else label_maps(labels)
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
        check_model_source(cfg.name_or_path, allow_pickle=cfg.allow_pickle)
        try:
            model = auto.from_pretrained(
                cfg.name_or_path,
                attn_implementation=attn,
                dtype=dtype,
                trust_remote_code=cfg.trust_remote_code,
                quantization_config=quantization,
                # True: transformers itself refuses .bin weights (a hub id is not checked on disk beforehand);
                # None: safetensors when present, else the pickle the user allowed
                use_safetensors=None if cfg.allow_pickle else True,
                **head,
            )
        except (OSError, SafetensorError) as exc:
            hint = (
                " (tuneyard loads safetensors weights only, unless model.allow_pickle: true)"
                if "safetensors" in str(exc) and not cfg.allow_pickle
                else ""
            )
            raise UserError(f"cannot load model '{cfg.name_or_path}': {exc}{hint}") from None
    rows = model.get_input_embeddings().num_embeddings  # not weight.shape: under ZeRO-3 a shard's is 0
    if len(tokenizer) > rows:  # data.chat_template added its marker tokens; new rows start at the mean embedding
        log.info("embeddings grow from %d to %d rows for the chat template's tokens", rows, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if task != "causal-lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads the last non-pad token
    count = sum(full_numel(p) for p in model.parameters())
    log.info("model: %s parameters, dtype %s, attention %s", f"{count:,}", dtype, attn)
    return model


def auto_model_class(task: str) -> type:
    """The transformers Auto class of a model task: causal-lm, sequence-classification or token-classification."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    return {
        "causal-lm": AutoModelForCausalLM,
        "sequence-classification": AutoModelForSequenceClassification,
        "token-classification": AutoModelForTokenClassification,
    }[task]


def label_maps(labels: list[str] | None) -> dict:
    """A classifier head's config fields: one output per named label (id2label, label2id), or one unnamed output."""
    if labels is None:
        return {"num_labels": 1}  # a reward model's score
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def full_numel(param: torch.nn.Parameter) -> int:
    """A parameter's element count, whole even where ZeRO-3 keeps only this rank's shard of it."""
    return getattr(param, "ds_numel", param.numel())
