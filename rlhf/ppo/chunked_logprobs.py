"""Per-token log-probs and entropy of the response tokens, the output head applied a chunk of tokens at a time.

A causal LM's forward ends in its output head: [batch, tokens, hidden] -> [batch, tokens, vocab]. At long responses
and large vocabularies that tensor, its float32 copy and its log-softmax dominate the memory of every RL pass (4k
tokens x 152k vocab is 2.5 GB per copy in float32). Here the model runs as it always does (DeepSpeed engine, ZeRO-3,
adapters), but a forward pre-hook on its head keeps the head's input and lets the head compute only the last
position. The response positions then go through the head `chunk_tokens` at a time; in training each chunk is
recomputed in the backward pass (activation checkpointing), so at most one [chunk, vocab] block is alive at once.

The head's output is post-processed the way the model's own forward does it (softcapping, logit scales); the last
position, which the model computed itself, checks that on a scorer's first call. A model family whose
post-processing is not reproduced here is scored with its whole logits instead, with a warning once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from tuneyard.rlhf.ppo import algorithms as algo

log = logging.getLogger(__name__)

# the model types that multiply their logits by config.logits_scaling (Granite's family divides by it)
_MULTIPLIED_LOGITS_SCALING = {"hyperclovax"}


def post_head(logits: Tensor, config) -> Tensor:
    """The model's own processing of its head's output, in the model's order: Cohere's logit_scale, Granite's
    division by logits_scaling, Falcon-H1's lm_head_multiplier, Gemma's final softcapping."""
    model_type = getattr(config, "model_type", "")
    scale = getattr(config, "logit_scale", None)
    if scale is not None and model_type.startswith("cohere"):
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        logits = logits * scaling if model_type in _MULTIPLIED_LOGITS_SCALING else logits / scaling
    multiplier = getattr(config, "lm_head_multiplier", None)
    if multiplier is not None:
        logits = logits * multiplier
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DeepSpeed engine (PEFT models answer for their base)."""
    return getattr(model, "module", model)


def _text_config(model: torch.nn.Module):
    config = _unwrapped(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def response_hidden_states(
    model: torch.nn.Module, forward: Callable[[], object], width: int
) -> tuple[Tensor, Tensor, Tensor, torch.nn.Module]:
    """Run `forward()` (a call of `model`) with the head computing its last position only.

    Returns the head's input at the `width` positions that predict the response tokens [B, width, H], at the last
    position [B, 1, H], the model's own logits there [B, 1, V], and the head."""
    head = _unwrapped(model).get_output_embeddings()
    seen: dict[str, Tensor] = {}

    def keep_last_position(module: torch.nn.Module, args: tuple) -> tuple:
        seen["hidden"] = args[0]
        return (args[0][:, -1:], *args[1:])

    handle = head.register_forward_pre_hook(keep_last_position)
    try:
        logits = forward().logits
    finally:
        handle.remove()
    hidden = seen["hidden"]
    return hidden[:, -width - 1 : -1], hidden[:, -1:], logits[:, -1:], head


def _chunk_figures(
    head: torch.nn.Module,
    config,
    hidden: Tensor,
    tokens: Tensor,
    distribution: tuple[float, float],
    entropy: bool,
) -> tuple[Tensor, Tensor]:
    logits = algo.sampling_logits(post_head(head(hidden), config), *distribution, keep=tokens)
    logprobs = algo.logprobs_from_logits(logits, tokens)
    return logprobs, (algo.entropy_from_logits(logits) if entropy else logprobs.new_zeros(()))


def chunked_figures(
    head: torch.nn.Module,
    config,
    hidden: Tensor,
    tokens: Tensor,
    distribution: tuple[float, float],
    chunk_tokens: int,
    entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of `tokens` [B, R] (and the entropy) under the sampling distribution of head(hidden [B, R, H]),
    `chunk_tokens` positions at a time; with gradients on, each chunk is recomputed in the backward pass."""
    batch, width = tokens.shape
    flat_hidden, flat_tokens = hidden.reshape(batch * width, -1), tokens.reshape(batch * width)
    # ZeRO-3 releases a frozen weight (a LoRA head's base, or the embeddings it is tied to) as soon as a recomputed
    # chunk has used it, before checkpoint compares what the recomputation saved with the forward's; it gathers it
    # again before the chunk's backward needs it, so the comparison alone is skipped there
    frozen_zero3 = any(hasattr(p, "ds_id") and not p.requires_grad for p in head.parameters())
    check = "none" if frozen_zero3 else "default"
    logprobs, entropies = [], []
    for start in range(0, batch * width, chunk_tokens):
        part = (head, config, flat_hidden[start : start + chunk_tokens], flat_tokens[start : start + chunk_tokens])
        if torch.is_grad_enabled():
            lp, ent = checkpoint(
                _chunk_figures, *part, distribution, entropy, use_reentrant=False, determinism_check=check
            )
        else:
            lp, ent = _chunk_figures(*part, distribution, entropy)
        logprobs.append(lp)
        entropies.append(ent)
    shaped = torch.cat(logprobs).reshape(batch, width)
    return shaped, (torch.cat(entropies).reshape(batch, width) if entropy else None)


class ChunkedScorer:
    """Log-probs and entropy of a micro-batch's responses, in chunks where the model's head allows it.

    The first call checks the head's post-processing against the model's own last position; the ranks of the role
    agree on the answer (a head call is collective under ZeRO-3), and it holds for the scorer's life."""

    def __init__(self, chunk_tokens: int, distribution: tuple[float, float]) -> None:
        """`chunk_tokens` 0: the whole logits at once."""
        self.chunk_tokens, self.distribution = chunk_tokens, distribution
        self.reproduces_head: bool | None = None if chunk_tokens else False

    def __call__(
        self, model: torch.nn.Module, forward: Callable[[], object], tokens: Tensor, entropy: bool
    ) -> tuple[Tensor, Tensor | None]:
        """(log-probs [B, R], entropy [B, R] or None) of `tokens`, the last R positions of the sequences that
        `forward()` runs `model` on."""
        width = tokens.shape[1]
        if self.reproduces_head is not False:
            hidden, last_hidden, last_logits, head = response_hidden_states(model, forward, width)
            config = _text_config(model)
            if self.reproduces_head is None:
                self.reproduces_head = self._check_head(head, config, last_hidden, last_logits)
            if self.reproduces_head:
                return chunked_figures(head, config, hidden, tokens, self.distribution, self.chunk_tokens, entropy)
        logits = algo.sampling_logits(forward().logits[:, -width - 1 : -1], *self.distribution, keep=tokens)
        return algo.logprobs_from_logits(logits, tokens), (algo.entropy_from_logits(logits) if entropy else None)

    @staticmethod
    def _check_head(head: torch.nn.Module, config, last_hidden: Tensor, last_logits: Tensor) -> bool:
        with torch.no_grad():
            ours = post_head(head(last_hidden), config).float()
            same = torch.allclose(ours, last_logits.float(), rtol=1e-3, atol=1e-4)
            if dist.is_available() and dist.is_initialized():
                every = torch.tensor([float(same)], device=last_logits.device)
                dist.all_reduce(every, op=dist.ReduceOp.MIN)
                same = bool(every.item())
        if not same:
            log.warning(
                "the %s model's output logits are post-processed in a way the chunked log-prob pass does not "
                "reproduce: its log-probs are taken from the whole logits (more memory at long responses)",
                getattr(config, "model_type", "?"),
            )
        return same
