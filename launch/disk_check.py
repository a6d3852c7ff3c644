"""Will the run's checkpoints fit? An estimate from the model's shape, checked before any worker starts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from tuneyard.training.config import ADAPTER_METHODS, TrainSpec
from tuneyard.training.errors import UserError

# fp32 weights in the checkpoint's model file + DeepSpeed's model states (fp32)
WEIGHT_BYTES = 4 + 4
# Adam's fp32 master weights, first and second moments per trainable parameter
OPTIMIZER_BYTES = 12
# an adapter trains a few per cent of the weights; counted high so the estimate errs on the safe side
ADAPTER_SHARE = 0.05


def parameter_count(spec: TrainSpec, vocab_size: int) -> int:
    """Parameters of the job's model: from a local folder's safetensors headers, else counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.model.init == "pretrained":
        stored = stored_parameter_count(Path(spec.model.name_or_path or ""))
        if stored is not None:
            return stored
    if spec.model.init == "scratch":
        arch = dict(spec.model.architecture or {})
        arch.setdefault("vocab_size", vocab_size)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    else:
        config = AutoConfig.from_pretrained(spec.model.name_or_path, trust_remote_code=spec.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.model.trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def stored_parameter_count(folder: Path) -> int | None:
    """Parameters in a model folder's safetensors files, from their headers alone; None where that cannot say.

    Milliseconds, where building the model on the meta device first imports its modeling code (0.5 s on the
    driver, before the workers start). Tied weights are stored once, as the model counts them. A quantized
    folder packs several weights per element, so it is counted on the meta device.
    """
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    config = folder / "config.json"
    if not config.is_file() or "quantization_config" in json.loads(config.read_text()):
        return None
    if index.is_file():
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif single.is_file():
        files = [single]
    else:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def run_bytes(parameters: int, adapter: bool, checkpoints: int, models: int = 1) -> int:
    """Bytes of `checkpoints` checkpoints plus the final folder, for `models` trained models (PPO: 2)."""
    trainable = parameters * ADAPTER_SHARE if adapter else parameters
    checkpoint = parameters * WEIGHT_BYTES + trainable * OPTIMIZER_BYTES
    final = trainable * 4
    return int(models * (checkpoints * checkpoint + final))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def check_free_space(spec: TrainSpec, run_dir: Path, vocab_size: int, checkpoints: int, models: int = 1) -> None:
    """Refuse a run whose checkpoints (keep_last of them) and final folder would not fit on the output disk."""
    try:
        parameters = parameter_count(spec, vocab_size)
    except (OSError, ValueError, KeyError):  # the config cannot be read here (a hub id offline): loading will say
        return
    need = run_bytes(parameters, spec.peft.method in ADAPTER_METHODS, checkpoints, models)
    free = shutil.disk_usage(run_dir).free
    if need > free:
        raise UserError(
            f"output.dir '{run_dir}' has {_size(free)} free, but this run needs about {_size(need)}: "
            f"{checkpoints} checkpoint(s) (output.keep_last) and the final folder of {models} model(s) of "
            f"{parameters / 1e9:,.2f}B parameters at about {WEIGHT_BYTES + OPTIMIZER_BYTES} bytes per parameter "
            "with Adam's state. Free space, put output.dir on a bigger disk, lower output.keep_last, or save "
            "fewer checkpoints (output.save_steps: 0)"
        )
