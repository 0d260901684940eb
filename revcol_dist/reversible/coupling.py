"""The reversible coupling of two columns: c = alpha * prev + f and its inverse. The model
computes it forward; the engine inverts it in backward."""

from __future__ import annotations

from typing import Optional

import torch

ALPHA_MIN = 1e-3
ALPHA_INIT = 0.5


def clamp_alpha(alpha: torch.Tensor, min_abs: float = ALPHA_MIN) -> torch.Tensor:
    """sign(alpha) * max(|alpha|, min_abs), computed functionally.

    The published code edits ``alpha.data`` in place inside forward; under ZeRO-3/FSDP that
    edit lands on a temporary gathered copy. Here the stored parameter is never touched and
    the gradient passes straight through (identity), which is what the published update
    sees after its in-place clamp. Zero counts as positive.
    """
    sign = torch.where(alpha < 0, -1.0, 1.0).to(alpha.dtype)
    clamped = sign * alpha.abs().clamp_min(min_abs)
    # exactly the clamped value (alpha - alpha is exactly 0), gradient exactly 1
    return clamped.detach() + (alpha - alpha.detach())


def shortcut(alpha: torch.Tensor, prev: Optional[torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    """alpha * prev + f; under autocast f may be bf16/fp16 while alpha and prev stay fp32,
    so type promotion keeps the residual stream in fp32.

    Column 0 has no previous map: alpha still enters the graph (times zero) so that every
    parameter receives a gradient, as in the published model, and DDP without
    find_unused_parameters works.
    """
    if prev is None:
        return f + alpha * 0.0
    return alpha * prev + f


def invert_shortcut(alpha: torch.Tensor, cur: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """prev = (cur - f) / alpha, the inverse of ``shortcut``."""
    return (cur - f) / alpha
