"""Reversible execution of RevCol columns, one autograd node per (column, level).

Forward runs each level without keeping its activations. The nodes are wired exactly as
the network's dataflow, so autograd orders backward by the real dependencies and each
node finds what it needs already reconstructed by the nodes that ran before it:

- its own output c_l(j): kept, or reconstructed by node (j+1, l);
- its down input c_{l-1}(j): likewise (or the stem output x for level 0);
- its up input c_{l+1}(j-1): reconstructed by node (j, l+1), which always runs first.

Each node recomputes its level once (same RNG, same autocast), reconstructs its shortcut
input c_l(j-1) = (c_l(j) - L(...)) / alpha_l from it, and backpropagates. Parameters and
alpha are node inputs and their gradients are returned, level by level: hooks, DDP buckets
and ``torch.autograd.grad`` see ordinary gradients, and no more than one level's
parameter gradients are in flight at a time.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..models.column import Column, clamp_alpha, invert_shortcut, shortcut
from .offload import Offloader
from .policy import DriftStats, ReversiblePolicy
from .replay import AutocastState, RNGState

Key = Tuple[int, int]


class _StepState:
    """Values shared by the nodes of one forward/backward: kept maps and reconstructions."""

    def __init__(self, columns, policy: ReversiblePolicy, stats: Optional[DriftStats], x: torch.Tensor) -> None:
        self.columns = columns
        self.stats = stats
        self.x = x.detach()
        self.autocast = AutocastState.capture(x.device)
        self.random = any(getattr(m, "p", 0.0) > 0.0 and m.training for c in columns for m in c.modules())
        self.offloader = Offloader(policy.offload_boundaries, x.device)
        self.values: Dict[Key, object] = {}
        self.kept: set = set()
        self.drift: Optional[torch.Tensor] = None
        self.checked = 0

    def keep(self, key: Key, t: torch.Tensor) -> None:
        if key not in self.kept:
            self.kept.add(key)
            self.values[key] = self.offloader.stash(t.detach())

    def get(self, key: Key) -> torch.Tensor:
        if key not in self.values:
            raise RuntimeError(
                f"reversible engine: column {key[0]} level {key[1]} was never reconstructed. Backward through "
                "reversible columns must cover the whole graph once (no partial autograd.grad, no second backward); "
                "set model.reversible = False for that use."
            )
        v = self.values[key]
        return self.offloader.fetch(v) if key in self.kept else v

    def pop(self, key: Key) -> torch.Tensor:
        v = self.get(key)
        del self.values[key]
        return v

    def reconstructed(self, key: Key, rec: torch.Tensor) -> torch.Tensor:
        """Store a reconstruction; at a kept map, measure the drift and use the kept value."""
        if key not in self.kept:
            self.values[key] = rec
            return rec
        kept = self.get(key)
        err = (rec - kept).abs().max() / kept.abs().max().clamp_min(torch.finfo(kept.dtype).tiny)
        self.drift = err if self.drift is None else torch.maximum(self.drift, err)
        self.checked += 1
        if self.stats is not None:
            self.stats.record(self.drift.detach(), self.checked)
        return kept


class _Level(torch.autograd.Function):
    @staticmethod
    def forward(ctx, st: _StepState, j: int, l: int, down, up, up2, prev, alpha, *params):
        col = st.columns[j]
        ctx.st, ctx.j, ctx.l = st, j, l
        ctx.has = (up is not None, up2 is not None, prev is not None)
        ctx.rng = RNGState.capture(st.x.device) if st.random else None
        ins = [t for t in (down, up, up2) if t is not None]
        f = col.level_forward(l, *ins)
        ctx.save_for_backward(alpha, *params)
        return shortcut(clamp_alpha(alpha), prev, f)

    @staticmethod
    def backward(ctx, g):
        st: _StepState = ctx.st
        j, l = ctx.j, ctx.l
        has_up, has_up2, has_prev = ctx.has
        col = st.columns[j]
        alpha, *params = ctx.saved_tensors
        out = st.pop((j, l))
        vals = [st.x if l == 0 else st.get((j, l - 1))]
        if has_up:
            vals.append(st.get((j - 1, l + 1)))
        if has_up2:
            vals.append(st.get((j - 1, 3)))
        needs = ctx.needs_input_grad
        in_needs = [needs[3]] + ([needs[4]] if has_up else []) + ([needs[5]] if has_up2 else [])
        ins = [v.detach().requires_grad_(n) for v, n in zip(vals, in_needs)]
        with torch.enable_grad(), st.autocast.context():
            if ctx.rng is not None:
                with ctx.rng.restored(st.x.device):
                    f = col.level_forward(l, *ins)
            else:
                f = col.level_forward(l, *ins)
        a = clamp_alpha(alpha.detach())
        prev = None
        if has_prev:
            with torch.no_grad():
                prev = st.reconstructed((j - 1, l), invert_shortcut(a, out, f))
        wrt_ins = [t for t, n in zip(ins, in_needs) if n]
        p_idx = [i for i, p in enumerate(params) if needs[8 + i]]
        wrt = wrt_ins + [params[i] for i in p_idx]
        grads = list(torch.autograd.grad(f, wrt, g.to(f.dtype), allow_unused=True)) if wrt else []
        del f
        g_ins = iter(grads[: len(wrt_ins)])
        in_grads = [next(g_ins) if n else None for n in in_needs]
        g_params: List[Optional[torch.Tensor]] = [None] * len(params)
        for i, gp in zip(p_idx, grads[len(wrt_ins) :]):
            g_params[i] = gp
        g_down = in_grads[0]
        g_up = in_grads[1] if has_up else None
        g_up2 = in_grads[-1] if has_up2 else None
        with torch.no_grad():
            g_prev = a * g if (has_prev and needs[6]) else None
            if not needs[7]:
                g_alpha = None
            elif has_prev:
                g_alpha = (g * prev).sum(dim=(0, 2, 3), keepdim=True).to(alpha.dtype)
            else:
                g_alpha = torch.zeros_like(alpha)
        return (None, None, None, g_down, g_up, g_up2, g_prev, g_alpha, *g_params)


class _Outputs(torch.autograd.Function):
    """Joins a segment's outputs so that all of its last column's nodes run in backward
    (their reconstructions are needed) even when only some maps are used."""

    @staticmethod
    def forward(ctx, *outs):
        ctx.set_materialize_grads(True)
        return tuple(o.view_as(o) for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        return grads


def _alpha_mins(columns: Sequence[Column]) -> List[List[float]]:
    """min |alpha_l| per column and level, in one host sync."""
    with torch.no_grad():
        mins = torch.stack([a.detach().abs().min().float() for col in columns for a in col.alphas()])
    flat = mins.tolist()
    return [flat[4 * j : 4 * j + 4] for j in range(len(columns))]


def run_reversible(
    columns: Sequence[Column],
    x: torch.Tensor,
    taps: Sequence[int],
    policy: ReversiblePolicy,
    stats: Optional[DriftStats] = None,
) -> Tuple[List[torch.Tensor], Dict[int, torch.Tensor]]:
    """Run columns[0..n) from the stem output x reversibly.

    Returns the last column's four maps and {column index: c3} for each index in ``taps``.
    """
    columns = list(columns)
    n = len(columns)
    last_plain = policy.keep_last_column and n >= 2
    seg = columns[:-1] if last_plain else columns
    st = _StepState(seg, policy, stats, x)
    k = policy.boundary_interval
    mins = _alpha_mins(seg)
    tapped: Dict[int, torch.Tensor] = {}
    prev: Optional[List[torch.Tensor]] = None
    for j, col in enumerate(seg):
        boundary = j == len(seg) - 1 or (k is not None and (j + 1) % k == 0)
        cur: List[torch.Tensor] = []
        for l in range(4):
            p = None if prev is None else prev[l]
            if p is not None and mins[j][l] < policy.min_reconstruct_alpha:
                st.keep((j - 1, l), p)
            ins = col.level_inputs(l, x, cur, prev or [None] * 4)
            down = ins[0]
            up = ins[1] if len(ins) > 1 else None
            up2 = ins[2] if len(ins) > 2 else None
            level = getattr(col, f"level{l}")
            out = _Level.apply(st, j, l, down, up, up2, p, getattr(col, f"alpha{l}"), *level.parameters())
            if boundary:
                st.keep((j, l), out)
            cur.append(out)
        prev = cur
        if j in taps:
            tapped[j] = cur[3]
    state = list(_Outputs.apply(*prev))
    if len(seg) - 1 in tapped:
        tapped[len(seg) - 1] = state[3]
    if last_plain:
        state = columns[-1](x, state)
        if n - 1 in taps:
            tapped[n - 1] = state[3]
    return state, tapped
