"""The reversible coupling of two columns: c = alpha * prev + f and its inverse. The model
computes it forward; the engine inverts it in backward."""

from __future__ import annotations

from typing import Optional

import torch

ALPHA_MIN = 1e-3
ALPHA_INIT = 0.5


class _ClampAlpha(torch.autograd.Function):
    """The clamped value forward, the gradient unchanged backward (straight through): four
    kernels and no backward work, where sign * max(|alpha|, m) + (alpha - alpha.detach()) took
    nine (RevCol-B reads its 64 alphas several times a step)."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, min_abs: float) -> torch.Tensor:
        return torch.where(alpha < 0, alpha.clamp_max(-min_abs), alpha.clamp_min(min_abs))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


def clamp_alpha(alpha: torch.Tensor, min_abs: float = ALPHA_MIN) -> torch.Tensor:
    """sign(alpha) * max(|alpha|, min_abs), computed functionally.

    The published code edits ``alpha.data`` in place inside forward; under ZeRO-3/FSDP that
    edit lands on a temporary gathered copy. Here the stored parameter is never touched and
    the gradient passes straight through (identity), which is what the published update
    sees after its in-place clamp. Zero counts as positive.
    """
    return _ClampAlpha.apply(alpha, min_abs)


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
