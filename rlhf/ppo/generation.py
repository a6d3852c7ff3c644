"""Sampling responses inside the policy actors (`ppo.generation.engine: hf`; the vLLM engines are
`tuneyard.rlhf.ppo.rollout_engine`, and `tuneyard.rlhf.ppo.rollout` wraps each engine in a rollout object).

`HFGenerator` runs Hugging Face `generate` in the policy actor on the current weights, with the job's sampling
settings only and the run's one stop set; under ZeRO-3 the shards are gathered for the duration (and DeepSpeed's
fetch hooks taken off, as TRL does), so each rank generates alone, however many steps its prompts need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tuneyard.rlhf.config import GenerationSection
from tuneyard.rlhf.ppo.sampling import StopSet


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


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model in a PEFT wrapper (else the model itself): the one whose settings `generate` reads."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def job_settings_only(model: torch.nn.Module) -> Iterator[None]:
    """`generate` without the model's generation_config.json for the block (repetition_penalty, top_k, ... would fill
    every setting the job leaves unset and change the distribution the answers come from)."""
    from transformers import GenerationConfig

    inner = transformers_model(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


class HFGenerator:
    """`model.generate` with the job's sampling settings alone (or greedy at temperature 0), seeded per call."""

    def __init__(self, model_of, tokenizer, stops: StopSet):
        self.model_of, self.tokenizer, self.stops = model_of, tokenizer, stops

    def generation_config(self, cfg: GenerationSection):
        """The job's generation settings as a GenerationConfig; nothing else reaches `generate`."""
        from transformers import GenerationConfig

        sampling = cfg.temperature > 0
        return GenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=sampling,
            temperature=cfg.temperature if sampling else 1.0,
            top_p=cfg.top_p if sampling else 1.0,
            top_k=0,
            eos_token_id=list(self.stops.token_ids) or None,
            pad_token_id=self.tokenizer.pad_token_id,
            # no stop_strings: HF's criterion reads the prompt's text too, and pads a row it stops; the driver cuts
            # the strings from the sampled tokens, for both engines alike
            use_cache=True,
        )

    @torch.no_grad()
    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: GenerationSection, seed: int
    ) -> list[list[int]]:
        """The sampled answers to the prompts, each cut after its first stop id (the driver cuts at stop strings);
        the seed makes a rerun (or a resumed run) sample the same tokens."""
        torch.manual_seed(seed)
        config = self.generation_config(cfg)
        with self.model_of() as model, job_settings_only(model):
            was_training = model.training
            model.eval()
            out = model.generate(
                input_ids=prompt_ids.to(model.device),
                attention_mask=prompt_mask.to(model.device),
                generation_config=config,
            )
            model.train(was_training)
        responses = []
        for row in out[:, prompt_ids.shape[1] :].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in self.stops.token_ids), len(row))
            responses.append(row[:end])
        return responses
