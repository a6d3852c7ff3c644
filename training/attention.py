"""Choosing the attention kernel: flash-attn where it can run, else sdpa, else eager."""

from __future__ import annotations

import importlib.util
import logging

import torch

from tuneyard.training.errors import UserError

log = logging.getLogger(__name__)


def flash_attn_importable() -> bool:
    """Whether the optional flash-attn package is installed and imports."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:  # a broken build raises anything from ImportError to OSError
        return False
    return True


def sdpa_available() -> bool:
    """Whether torch offers scaled_dot_product_attention."""
    return hasattr(torch.nn.functional, "scaled_dot_product_attention")


def choose_attn_implementation(
    requested: str, *, flash_available: bool, cuda_available: bool, sdpa: bool = True, strict: bool = False
) -> tuple[str, str]:
    """Return (implementation, reason) for a request of auto|flash_attention_2|sdpa|eager."""
    flash_ok = flash_available and cuda_available
    fallback = "sdpa" if sdpa else "eager"
    if requested == "auto":
        if flash_ok:
            return "flash_attention_2", "auto: flash-attn imports and CUDA is present"
        why = "flash-attn is not installed" if not flash_available else "no CUDA device"
        return fallback, f"auto: {why}, using {fallback}"
    if requested == "flash_attention_2" and not flash_ok:
        why = "flash-attn is not installed (pip install 'tuneyard[gpu]')" if not flash_available else "no CUDA device"
        if strict:
            raise UserError(
                f"model.attn_implementation is flash_attention_2 but {why}; "
                "set model.attn_implementation: auto, or model.strict_attention: false to fall back to sdpa"
            )
        return fallback, f"flash_attention_2 requested but {why}: falling back to {fallback}"
    if requested == "sdpa" and not sdpa:
        if strict:
            raise UserError("model.attn_implementation is sdpa but this torch has no scaled_dot_product_attention")
        return "eager", "sdpa requested but unavailable: falling back to eager"
    return requested, f"{requested} as requested"


def resolve_attn_implementation(requested: str, strict: bool = False) -> str:
    """Probe this machine, pick the implementation and log the choice."""
    choice, reason = choose_attn_implementation(
        requested,
        flash_available=flash_attn_importable(),
        cuda_available=torch.cuda.is_available(),
        sdpa=sdpa_available(),
        strict=strict,
    )
    if requested == "flash_attention_2" and choice != requested:
        log.warning("attention: %s", reason)
    else:
        log.info("attention: %s", reason)
    return choice
