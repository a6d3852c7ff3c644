"""Tiled MLP (`training.tiled_mlp`): each decoder layer's gated MLP runs over the sequence in tiles through
DeepSpeed's `TiledMLP`, so its four [tokens x intermediate_size] tensors (gate, up, activation, product) exist for
one tile at a time and the backward keeps only the MLP's input; the price is one more MLP forward per step (the
backward recomputes each tile).

A tile is `hidden_size` tokens as ALST does it (a tile's intermediates are then about the size of the layer's
hidden states), and at least TILE_MIN_TOKENS: on 2 CPU cores a small model's MLP (hidden 256, intermediate 1024,
8192 tokens) took 1.35x its whole forward and backward in tiles of 256 tokens, 1.04x in tiles of 512 and 1.0x in
tiles of 1024 (its whole backward reads the big saved tensors back from memory; a tile's stay in cache).

The gated MLPs are the Llama family's (Llama, Qwen2/3, Mistral, Gemma, Phi-3 and the like: `gate_proj`,
`up_proj`, `down_proj`, `act_fn`); a model without one is refused when the job asks for tiling.
"""

from __future__ import annotations

import logging
import math
import types

import torch
import torch.distributed as dist

from tuneyard.training.config import TrainSpec
from tuneyard.training.errors import UserError

log = logging.getLogger(__name__)

# tokens per row from which `tiled_mlp: auto` tiles: there a layer's MLP intermediates (4 x tokens x
# intermediate_size) are the largest activations of the step and the extra MLP forward costs little beside them
TILED_MLP_FROM_TOKENS = 8192
GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")
TILE_MIN_TOKENS = 512


def tiled_mlp_wanted(spec: TrainSpec) -> bool:
    """training.tiled_mlp, its auto resolved: on for rows of TILED_MLP_FROM_TOKENS tokens or more, or shared by
    sequence parallelism (long-sequence jobs, where the MLP's intermediates dominate)."""
    choice = spec.training.tiled_mlp
    if choice != "auto":
        return choice
    return spec.data.max_length >= TILED_MLP_FROM_TOKENS or spec.training.sequence_parallel > 1


def gated_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's gated MLP modules (every module with gate_proj, up_proj, down_proj and act_fn)."""
    return [m for m in model.modules() if all(hasattr(m, part) for part in GATED_MLP_PARTS)]


def gated_mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """down(act(gate(x)) * up(x)): what the Llama family's MLP computes."""
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def tiled_gated_mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP over tiles of max(hidden_size, TILE_MIN_TOKENS) tokens, recomputed tile by tile in the
    backward."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    trained = [p for p in mlp.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not x.requires_grad:
        # nothing to save for a backward (evaluation, frozen layers below every trained one), or an input that
        # takes no gradient, whose MLP's weights TiledMLP's backward would not reach
        return gated_mlp_forward(mlp, x)
    tiles = math.ceil(x.shape[-2] / max(x.shape[-1], TILE_MIN_TOKENS))
    if any(hasattr(p, "ds_id") for p in mlp.parameters()) and dist.is_initialized():
        # ZeRO-3 gathers the weights for every tile, a collective: every rank runs as many tiles as the longest
        count = torch.tensor(tiles)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        tiles = int(count.item())
    return TiledMLP.apply(gated_mlp_forward, mlp, x, tiles, trained)


def tile_mlps(model: torch.nn.Module, spec: TrainSpec) -> int:
    """Make every gated MLP of `model` run in tiles when the job wants it; returns how many were tiled."""
    if not tiled_mlp_wanted(spec):
        return 0
    mlps = gated_mlps(model)
    if not mlps:
        if spec.training.tiled_mlp is True:
            raise UserError(
                f"training.tiled_mlp: true tiles gated MLPs ({', '.join(GATED_MLP_PARTS)}: the Llama, Qwen, Mistral "
                f"and Gemma families), and {type(model).__name__} has none; set training.tiled_mlp: false"
            )
        log.info("tiled MLP: %s has no gated MLP; its MLPs run whole", type(model).__name__)
        return 0
    for mlp in mlps:
        mlp.forward = types.MethodType(tiled_gated_mlp_forward, mlp)
    log.info("tiled MLP: %d layers' MLPs run in tiles of max(hidden_size, %d) tokens", len(mlps), TILE_MIN_TOKENS)
    return len(mlps)
