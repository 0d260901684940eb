"""The reversible coupling of two columns: c = alpha * prev + f and its inverse. The model
computes it forward; the engine inverts it in backward."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

ALPHA_MIN = 1e-3
ALPHA_INIT = 0.5


class _ClampAlpha(torch.autograd.Function):
    """The clamped value forward, the gradient unchanged backward (straight through): four
    kernels and no backward work, where sign * max(|alpha|, m) + (alpha - alpha.detach()) took
    nine (RevCol-B reads its 64 alphas several times a step)."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, min_abs: float) -> torch.Tensor:
        return _clamped(alpha, min_abs)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


def _clamped(alpha: torch.Tensor, min_abs: float) -> torch.Tensor:
    return torch.where(alpha < 0, alpha.clamp_max(-min_abs), alpha.clamp_min(min_abs))


class _ClampAlphas(torch.autograd.Function):
    """Several alphas clamped in one pass: one concatenation and the four kernels of one clamp
    for all of them (a column's four alphas: 5 kernels, were 16), straight through backward."""

    @staticmethod
    def forward(ctx, min_abs: float, *alphas: torch.Tensor):
        return split_like(_clamped(torch.cat([a.reshape(-1) for a in alphas]), min_abs), alphas)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *grads)


def column_alphas(columns: Sequence[torch.nn.Module]) -> Optional[List[Tuple[torch.Tensor, ...]]]:
    """Each column's four clamped alphas, every column's in one pass (five kernels, where a
    pass per column takes five each); None where ZeRO-3 partitions them (each column's are
    gathered only inside its own forward)."""
    alphas = [getattr(c, f"alpha{l}") for c in columns for l in range(4)]
    if not alphas or any(hasattr(a, "ds_id") for a in alphas):
        return None
    flat = clamp_alphas(alphas)
    return [flat[4 * j:4 * j + 4] for j in range(len(columns))]


def split_like(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Views of a concatenation, shaped as the tensors it concatenated."""
    return tuple(v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in like]), like))


def clamp_alphas(alphas: Sequence[torch.Tensor], min_abs: float = ALPHA_MIN) -> Tuple[torch.Tensor, ...]:
    """``clamp_alpha`` of each, bitwise, in one pass."""
    return _ClampAlphas.apply(min_abs, *alphas)


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
    return _Coupling.apply(_stream(alpha), _stream(prev), f)


def coupling_operands(alpha: torch.Tensor, prev: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(alpha, prev) as ``shortcut`` multiplies them (in the stream's precision), for a block
    that computes the coupling itself (``block_kernels.forward_full``)."""
    return _stream(alpha), _stream(prev)


class _Coupling(torch.autograd.Function):
    """alpha * prev + f in one pass over the map (addcmul), and a backward of three kernels
    (alpha's gradient a product and a sum, prev's a product; f's is g) where addcmul's own
    runs five (it multiplies by its scalar factor as well)."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, prev: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(alpha, prev)
        ctx.f_dtype = f.dtype
        return torch.addcmul(f, alpha, prev)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        alpha, prev = ctx.saved_tensors
        need_alpha, need_prev, need_f = ctx.needs_input_grad
        g_alpha = (g * prev).sum(dim=(0, 2, 3), keepdim=True) if need_alpha else None
        g_prev = g * alpha if need_prev else None
        return g_alpha, g_prev, g.to(ctx.f_dtype) if need_f else None


def invert_shortcut(alpha: torch.Tensor, cur: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """prev = (cur - f) / alpha, the inverse of ``shortcut`` (in the stream's precision)."""
    return (_stream(cur) - f) / _stream(alpha)


def drift_check(rec: torch.Tensor, kept: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(max |rec - kept|, max |kept|): a reconstruction's drift from the map kept for it."""
    return torch.linalg.vector_norm(rec - kept, float("inf")), torch.linalg.vector_norm(kept, float("inf"))


def with_carried(g: Optional[torch.Tensor], carried: Optional[Tuple[torch.Tensor, torch.Tensor]]):
    """A map's gradient g plus the next column's part alpha' * g' (``carried``; g None: that part
    alone; nothing carried: g)."""
    if carried is None:
        return g
    return carried[0] * carried[1] if g is None else torch.addcmul(g, *carried)


def shortcut_backward(alpha: torch.Tensor, cur: torch.Tensor, f: torch.Tensor, g: Optional[torch.Tensor],
                      kept: Optional[torch.Tensor], want_prev: bool, want_alpha: bool,
                      carried: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """The reversible backward of c = alpha * prev + f, given c's gradient ``g``: prev
    reconstructed (``invert_shortcut``), or where prev was ``kept`` the kept value and the
    reconstruction's drift against it (max |error|, max |kept|); prev's gradient alpha * g and
    alpha's sum(g * prev) over batch and space, where wanted.

    ``carried`` (alpha', g'): the part of c's gradient that the next column's coupling
    c' = alpha' * c + f' sends, alpha' * g', added here (g None: the only part) in the pass that
    reads g anyway, instead of written out by that column's node and summed into g by autograd
    (two passes over the map). Returns (prev, g_prev, g_alpha, error, scale, g): g with that
    part added, the gradient of f.

    One function of tensors, so that ``train.compile`` runs it as one graph (a pointwise pass
    and a reduction over the map, where it took six to nine kernels); eager, the same ops as
    written out in the engine before."""
    g = with_carried(g, carried)
    rec = invert_shortcut(alpha, cur, f)
    error = scale = None
    if kept is not None:
        error, scale = drift_check(rec, kept)
        rec = kept
    g_prev = alpha * g if want_prev else None
    g_alpha = (g * rec).sum(dim=(0, 2, 3), keepdim=True) if want_alpha else None
    return rec, g_prev, g_alpha, error, scale, g
