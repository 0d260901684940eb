"""Weights cast once per forward for compiled graphs that run under ordinary autograd.

Under autocast a compiled graph casts each fp32 conv and matmul weight it receives, in every
call: a decoder stage in its forward, its checkpointed decoder's recomputation and its own
(three times a step), and on a GPU each cast is a kernel of its own. Here the weights of the
modules ``parallel/compile.py`` names (the decoders; the fusions of a plain forward) are cast
once when the model's forward starts, as one differentiable node: one concatenation and one
cast forward, one concatenation and one cast of the gradients backward, where autocast's
casts give each weight's gradient in the parameter's dtype likewise. The compiled functions
take the casts in place of the parameters while they are current (same grad mode and autocast
dtype, parameters not changed since: their version counters).
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..reversible.lean_block import aligned_flat


class _FlatCast(torch.autograd.Function):
    """params -> each in ``dtype``, views of one aligned buffer; backward: the gradients
    concatenated, cast back once and handed out as views."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *params: torch.Tensor):
        flat, offsets = aligned_flat(params, dtype)
        ctx.layout = [(o, p.shape, p.dtype) for o, p in zip(offsets, params)]
        ctx.total = flat.numel()
        ctx.set_materialize_grads(False)
        return tuple(flat[o : o + p.numel()].view(p.shape) for o, p in zip(offsets, params))

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        given = next((g for g in grads if g is not None), None)
        if given is None:
            return (None,) * (len(grads) + 1)
        zeros = None
        pieces, at = [], 0
        for (o, shape, _), g in zip(ctx.layout, grads):
            n = shape.numel()
            if o > at:  # the alignment gap before this tensor
                pieces.append(o - at)
            pieces.append(g.reshape(-1) if g is not None else n)
            at = o + n
        if ctx.total > at:
            pieces.append(ctx.total - at)
        width = max((p for p in pieces if isinstance(p, int)), default=0)
        if width:
            zeros = torch.zeros(width, dtype=given.dtype, device=given.device)
        flat = torch.cat([zeros[:p] if isinstance(p, int) else p for p in pieces])
        flat = flat.to(ctx.layout[0][2])
        return (None, *(flat[o : o + shape.numel()].view(shape) if g is not None else None
                        for (o, shape, _), g in zip(ctx.layout, grads)))


class _Casts:
    """One module's casts: by id of the parameter, with what makes them current."""

    def __init__(self, dtype: torch.dtype, params: Sequence[torch.Tensor], casts: Sequence[torch.Tensor]) -> None:
        self.dtype = dtype
        self.params = list(params)
        self.versions = [p._version for p in params]
        self.by_id = {id(p): c for p, c in zip(params, casts)}

    def current(self) -> bool:
        return (torch.is_grad_enabled() and _autocast_dtype(self.params[0]) == self.dtype
                and all(p._version == v for p, v in zip(self.params, self.versions)))


_CASTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def cast_once(targets: Sequence[Tuple[torch.nn.Module, Sequence[torch.Tensor]]], dtype: torch.dtype) -> None:
    """Each (module, tensors) pair's tensors in ``dtype``, all in one ``_FlatCast`` node;
    replaces the modules' earlier casts. Tensors already in ``dtype`` are left out."""
    modules, params = [], []
    for module, tensors in targets:
        ps = [t for t in tensors if t is not None and t.dtype != dtype]
        _CASTS.pop(module, None)
        if ps:
            modules.append((module, len(ps)))
            params.extend(ps)
    if not params:
        return
    casts = _FlatCast.apply(dtype, *params)
    at = 0
    for module, n in modules:
        _CASTS[module] = _Casts(dtype, params[at : at + n], casts[at : at + n])
        at += n


def casts_of(module: torch.nn.Module) -> Dict[int, torch.Tensor]:
    """The module's current casts by id of their parameter (empty where none are current)."""
    casts = _CASTS.get(module)
    return casts.by_id if casts is not None and casts.current() else {}


def drop(modules: Sequence[torch.nn.Module]) -> None:
    for m in modules:
        _CASTS.pop(m, None)


def swapped(args, casts: Dict[int, torch.Tensor]):
    """``args`` (nested tuples) with each tensor that has a cast replaced by it."""
    if not casts:
        return args
    if isinstance(args, torch.Tensor):
        return casts.get(id(args), args)
    if isinstance(args, tuple) and not hasattr(args, "_fields"):
        return tuple(swapped(a, casts) for a in args)
    return args


__all__: List[str] = ["cast_once", "casts_of", "drop", "swapped"]
