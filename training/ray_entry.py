"""Ray Train's entry points, in a module that imports none of the training stack.

TorchTrainer pickles its training function by reference, so the driver imports the function's module. The
recipes import transformers' Trainer, PEFT, bitsandbytes and DeepSpeed: seconds of CPU on the driver,
spent while the workers start on the same cores. These entry points import the recipes inside the worker.
"""

from __future__ import annotations


def train_worker(payload: dict) -> None:
    """pretrain and sft: `training.runner.ray_train_worker`, imported in the worker."""
    from training.runner import ray_train_worker

    ray_train_worker(payload)


def preference_worker(payload: dict) -> None:
    """reward, dpo, kto and grpo: `rlhf.stages.ray_train_worker`, imported in the worker."""
    from rlhf.stages import ray_train_worker

    ray_train_worker(payload)


def task_head_worker(payload: dict) -> None:
    """classify and token-classify: `training.classify.ray_train_worker`, imported in the worker."""
    from training.classify import ray_train_worker

    ray_train_worker(payload)
