"""The DeepSpeed dict handed to the HF/TRL trainer, built from the job's `deepspeed` section."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tuneyard.training.config import DeepSpeedSection
from tuneyard.training.errors import UserError


def build_deepspeed_config(section: DeepSpeedSection, cuda: bool = False) -> dict:
    """A ZeRO config whose batch, clipping and precision fields are "auto" (filled by the trainer).

    There is no `train_batch_size` key: the trainer derives it, and a stale one breaks CPU runs.
    A raw `deepspeed.config` JSON wins over every switch.
    """
    if section.config:
        path = Path(section.config)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"deepspeed.config: '{path}' does not exist") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"deepspeed.config: {path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    zero: dict = {"stage": section.zero_stage}
    if section.zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_bucket_size="auto")
    if section.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            # the final HF folder needs whole weights, gathered from the shards at save time
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if section.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if section.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    config: dict = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    if section.offload_optimizer:
        # offloaded optimizer state needs DeepSpeed's own CPU Adam, so DeepSpeed builds the optimizer
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config


def zero_stage(section: DeepSpeedSection | None) -> int:
    """The ZeRO stage a job runs under: its switch, or its raw deepspeed.config's; 0 without DeepSpeed."""
    if section is None:
        return 0
    return int(build_deepspeed_config(section).get("zero_optimization", {}).get("stage", 0))


def import_deepspeed_without_mlflow() -> None:
    """Import DeepSpeed with MLflow hidden from it, as if MLflow were not installed.

    DeepSpeed's autotuner imports MLflow whenever DeepSpeed is imported, though only autotuning (which we do
    not run) uses it, so each worker would pay MLflow's import at start-up for nothing. MLflow stays importable
    afterwards.
    """
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        return
    sys.modules["mlflow"] = None  # None in sys.modules is how Python refuses an import
    try:
        import deepspeed  # noqa: F401
    finally:
        del sys.modules["mlflow"]
