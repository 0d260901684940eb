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


def _stream(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: the residual stream's precision, whatever the weights' (DeepSpeed's bf16
    mode casts every parameter, the alphas included, to bf16)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def shortcut(alpha: torch.Tensor, prev: Optional[torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    """alpha * prev + f, in fp32 (fp64 stays fp64) even where f comes out of bf16/fp16 autocast
    or the weights themselves are bf16: reconstruction divides by alpha, and a bf16 stream would
    lose to rounding what the inverse needs.

    Column 0 has no previous map: alpha still enters the graph (times zero) so that every
    parameter receives a gradient, as in the published model, and DDP without
    find_unused_parameters works.
    """
    if prev is None:
        return _stream(f) + _stream(alpha) * 0.0
    return _stream(alpha) * _stream(prev) + f


def invert_shortcut(alpha: torch.Tensor, cur: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """prev = (cur - f) / alpha, the inverse of ``shortcut`` (in the stream's precision)."""
    return (_stream(cur) - f) / _stream(alpha)
