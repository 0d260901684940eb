"""Weights cast once per forward for compiled graphs that run under ordinary autograd.

Under autocast a compiled graph casts each fp32 conv and matmul weight it receives, in every
call: a decoder stage in its forward, its checkpointed decoder's recomputation and its own
(three times a step), and on a GPU each cast is a kernel of its own. Here the weights of the
groups ``parallel/compile.py`` names when the model's forward starts (each decoder; each
column's fusions in a plain forward) are cast once per forward and group, as one differentiable
node: a zero-filled gap, one concatenation and one cast forward and the same backward, where
autocast's casts give each weight's gradient in the parameter's dtype likewise. A group's node
is made when its first module first asks (``casts_of``), not when the forward starts: the
backward engine runs a node after those made later, so made late it runs as soon as its
group's backward is done (a decoder's, a column's) and DDP can reduce those gradients while the
rest of the backward runs. Its casts are dropped once its backward has run.

The compiled functions take the casts in place of the parameters while they are current (grad
mode on, the same autocast dtype, parameters unchanged since: their version counters and
storage).
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..reversible.lean_block import aligned_flat


class _FlatCast(torch.autograd.Function):
    """params -> each in ``dtype``, views of one aligned buffer; backward: the gradients
    concatenated, cast back once and handed out as views; its group released."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, group: "weakref.ref", *params: torch.Tensor):
        flat, offsets = aligned_flat(params, dtype)
        ctx.layout = [(o, p.shape, p.dtype) for o, p in zip(offsets, params)]
        ctx.total = flat.numel()
        ctx.group = group  # weak: the group holds the casts, which hold this node
        ctx.set_materialize_grads(False)
        return tuple(flat[o : o + p.numel()].view(p.shape) for o, p in zip(offsets, params))

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        group = ctx.group()
        if group is not None:
            group.release()
        given = next((g for g in grads if g is not None), None)
        if given is None:
            return (None, None) + (None,) * len(grads)
        pieces, at = [], 0
        for (o, shape, _), g in zip(ctx.layout, grads):
            if o > at:  # the alignment gap before this tensor
                pieces.append(o - at)
            pieces.append(g.reshape(-1) if g is not None else shape.numel())
            at = o + shape.numel()
        if ctx.total > at:
            pieces.append(ctx.total - at)
        gaps = [p for p in pieces if isinstance(p, int)]
        zeros = torch.zeros(max(gaps, default=0), dtype=given.dtype, device=given.device) if gaps else None
        flat = torch.cat([zeros[:p] if isinstance(p, int) else p for p in pieces]).to(ctx.layout[0][2])
        return (None, None, *(flat[o : o + shape.numel()].view(shape) if g is not None else None
                              for (o, shape, _), g in zip(ctx.layout, grads)))


class _Group:
    """Modules whose weights share one cast node, made at the first ``casts_of`` of any."""

    def __init__(self, targets: Sequence[Tuple[torch.nn.Module, Sequence[torch.Tensor]]], dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.targets = [(m, [t for t in ts if t is not None and t.dtype != dtype]) for m, ts in targets]
        self.params = [t for _, ts in self.targets for t in ts]
        self.stamp = _stamp(self.params)
        self.by_module: Optional[Dict[torch.nn.Module, Dict[int, torch.Tensor]]] = None

    def cast(self) -> None:
        self.by_module = {m: {} for m, _ in self.targets}
        if not self.params:
            return
        casts = iter(_FlatCast.apply(self.dtype, weakref.ref(self), *self.params))
        for m, ts in self.targets:
            self.by_module[m] = {id(t): next(casts) for t in ts}

    def release(self) -> None:
        """The node's backward ran: the casts' last use."""
        for m, _ in self.targets:
            if _GROUPS.get(m) is self:
                del _GROUPS[m]

    def current(self) -> bool:
        return (torch.is_grad_enabled() and bool(self.params) and _autocast_dtype(self.params[0]) == self.dtype
                and _stamp(self.params) == self.stamp)


_GROUPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # module -> its _Group


def _stamp(params: Sequence[torch.Tensor]) -> tuple:
    """What changes when a parameter does: its version counter (in-place updates), its storage
    (``.data`` rebound or written through, which the counter does not see)."""
    return tuple((p._version, p.data_ptr()) for p in params)


def _autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def register(groups: Sequence[Sequence[Tuple[torch.nn.Module, Sequence[torch.Tensor]]]], dtype: torch.dtype) -> None:
    """A forward starts: each group's (module, tensors autocast would cast) pairs, to be cast
    to ``dtype`` as one node when first asked for; replaces the modules' earlier casts."""
    for targets in groups:
        group = _Group(targets, dtype)
        for m, _ in targets:
            _GROUPS[m] = group


def casts_of(module: torch.nn.Module) -> Dict[int, torch.Tensor]:
    """The module's current casts by id of their parameter (empty where none are current),
    its group's node made on the first call."""
    group = _GROUPS.get(module)
    if group is None or not group.current():
        return {}
    if group.by_module is None:
        group.cast()
    return group.by_module[module]


def drop(modules: Sequence[torch.nn.Module]) -> None:
    for m in modules:
        _GROUPS.pop(m, None)


__all__: List[str] = ["casts_of", "drop", "register"]
