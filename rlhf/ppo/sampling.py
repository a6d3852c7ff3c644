"""What both rollout engines share about sampling: the distribution an answer is drawn from (and so scored under),
the one set of stops, and where and why an answer ends.

Both engines stop at the same token ids (`StopSet.token_ids`); the stop strings, which vLLM cannot see without its
tokenizer, are cut on the driver for both alike (`end_of_answer`), so the same sampled tokens give the same answer
whichever engine drew them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tuneyard.rlhf.config import GenerationSection


def scoring_distribution(cfg: GenerationSection) -> tuple[float, float]:
    """(temperature, top_p) of the distribution the answers are sampled from; greedy answers are scored at (1, 1)."""
    if cfg.temperature <= 0:
        return 1.0, 1.0
    return cfg.temperature, cfg.top_p


@dataclass(frozen=True)
class StopSet:
    """Where answers end: token ids (kept as the answer's last token) and strings (the token completing one kept)."""

    token_ids: tuple[int, ...]
    strings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """For the actors' payload."""
        return {"token_ids": list(self.token_ids), "strings": list(self.strings)}

    @classmethod
    def from_dict(cls, data: dict) -> StopSet:
        """The inverse of `to_dict`."""
        return cls(tuple(data["token_ids"]), tuple(data["strings"]))


def generation_config_eos_ids(model_source: str, trust_remote_code: bool = False) -> list[int]:
    """The eos_token_id(s) of a model folder's (or hub id's) generation_config.json; none when it has no such file."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model_source, trust_remote_code=trust_remote_code)
    except OSError:  # no generation_config.json: the model config's own EOS is the tokenizer's
        return []
    eos = config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def stop_set(
    tokenizer: PreTrainedTokenizerBase, model_source: str, cfg: GenerationSection, trust_remote_code: bool
) -> StopSet:
    """The job's stops: the tokenizer's EOS, every EOS id of the model's generation_config, the chat template's end
    of turn (all of them only with `stop_at_eos`), and `generation.stop`."""
    from tuneyard.training.data.chat_templates import end_of_turn_id

    if not cfg.stop_at_eos:
        return StopSet((), tuple(cfg.stop))
    ids = [
        tokenizer.eos_token_id,
        *generation_config_eos_ids(model_source, trust_remote_code),
        end_of_turn_id(tokenizer),
    ]
    return StopSet(tuple(dict.fromkeys(i for i in ids if i is not None)), tuple(cfg.stop))


def end_of_answer(tokens: list[int], stops: StopSet, decode: Callable[[list[int]], str]) -> tuple[int, bool]:
    """(how many of the sampled tokens the answer keeps, whether it finished at a stop) for one sampled answer.

    The answer ends after its first stop id or after the token that completes its first stop string; one that
    reaches neither (the engine stopped at generation.max_new_tokens) is truncated."""
    end = next((i + 1 for i, token in enumerate(tokens) if token in stops.token_ids), None)
    if stops.strings:
        # once a prefix's text holds a stop string, every longer prefix's text does, so the shortest prefix
        # holding one is found by bisection
        limit = end or len(tokens)
        if any(s in decode(tokens[:limit]) for s in stops.strings):
            low, high = 1, limit
            while low < high:
                middle = (low + high) // 2
                if any(s in decode(tokens[:middle]) for s in stops.strings):
                    high = middle
                else:
                    low = middle + 1
            end = low
    return (end, True) if end is not None else (len(tokens), False)
