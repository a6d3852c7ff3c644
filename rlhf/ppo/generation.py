"""Sampling responses inside the policy actors (`ppo.generation.engine: hf`; the vLLM engines are
`tuneyard.rlhf.ppo.rollout_engine`, and the controller's `generate_rollout` chooses between them).

`HFGenerator` runs Hugging Face `generate` in the policy actor on the current weights; under ZeRO-3
the shards are gathered for the duration (and DeepSpeed's fetch hooks taken off, as TRL does), so
each rank generates alone, however many steps its prompts need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tuneyard.rlhf.config import GenerationSection


@contextlib.contextmanager
def whole_weights(engine) -> Iterator[torch.nn.Module]:
    """The engine's module with whole (gathered) weights under ZeRO-3; the module as it is otherwise."""
    if engine is None or engine.zero_optimization_stage() != 3:
        yield engine.module if engine is not None else None
        return
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        remove_hooks(engine)
        try:
            yield engine.module
        finally:
            add_hooks(engine)


class HFGenerator:
    """`model.generate` with sampling (or greedy at temperature 0), seeded per call."""

    def __init__(self, model_of, eos_id: int, pad_id: int):
        self.model_of, self.eos_id, self.pad_id = model_of, eos_id, pad_id

    @torch.no_grad()
    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: GenerationSection, seed: int
    ) -> list[list[int]]:
        """Responses to the prompts; the seed makes a rerun (or a resumed run) sample the same tokens."""
        torch.manual_seed(seed)
        sampling = cfg.temperature > 0
        with self.model_of() as model:
            was_training = model.training
            model.eval()
            out = model.generate(
                input_ids=prompt_ids.to(model.device),
                attention_mask=prompt_mask.to(model.device),
                max_new_tokens=cfg.max_new_tokens,
                do_sample=sampling,
                temperature=cfg.temperature if sampling else None,
                top_p=cfg.top_p if sampling else None,
                top_k=0 if sampling else None,
                eos_token_id=self.eos_id if cfg.stop_at_eos else None,
                pad_token_id=self.pad_id,
                use_cache=True,
            )
            model.train(was_training)
        responses = []
        for row in out[:, prompt_ids.shape[1] :].tolist():
            if cfg.stop_at_eos and self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
            responses.append(row)
        return responses
