"""DPO loss maths as pure functions, and how a job's loss maps onto TRL's loss terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean DPO loss from summed completion log-probs: sigmoid (cDPO when label_smoothing > 0), ipo, hinge."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        # IPO on per-token averages (as TRL does, so beta does not scale with completion length)
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the completion token counts")
        ipo_delta = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo_loss covers sigmoid, hinge and ipo, not {loss_type}")
    return losses.mean()


def trl_loss_terms(
    loss_type: str, label_smoothing: float, sft_weight: float = 0.0
) -> tuple[list[str], list[float] | None]:
    """TRL `loss_type` and `loss_weights` for a job's loss (plus RPO's NLL term on chosen when sft_weight > 0).

    TRL's sigmoid ignores label smoothing, so cDPO, (1-e)*L(d) + e*L(-d) with L(x) = -log sigmoid(beta*x),
    is built from TRL's own terms: its "robust" loss is ((1-e)*L(d) - e*L(-d)) / (1-2e), hence
    cDPO = 2(1-e) * sigmoid - (1-2e) * robust exactly, gradients included.
    """
    if loss_type == "sigmoid" and label_smoothing > 0:
        types, weights = ["sigmoid", "robust"], [2 * (1 - label_smoothing), -(1 - 2 * label_smoothing)]
    else:
        types, weights = [loss_type], [1.0]
    if sft_weight > 0:
        types, weights = [*types, "sft"], [*weights, sft_weight]
    return types, (weights if len(types) > 1 else None)
