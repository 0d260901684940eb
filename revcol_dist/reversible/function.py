"""Reversible execution of a run of RevCol columns.

Forward runs the columns without building a graph and keeps only the segment's outputs,
every k-th column boundary, and the inputs of levels whose alpha is too small to divide by.
Backward walks the columns from last to first and, one level at a time, recomputes the
level (same RNG, same autocast), reconstructs the previous column's map from it
(``c' = (c - L(...)) / alpha``) and backpropagates through it. Parameters, alphas
included, are inputs of the Function and their gradients are returned, so
``torch.autograd.grad``, DDP and hooks on parameters see ordinary gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..models.column import Column, invert_shortcut, shortcut
from .offload import Offloader
from .policy import DriftStats, ReversiblePolicy
from .replay import AutocastState, RNGState


@dataclass
class _Spec:
    """Everything the Function needs that is not a tensor input."""

    columns: Sequence[Column]
    taps: Tuple[int, ...]  # indices (within the segment) whose c3 is also an output
    policy: ReversiblePolicy
    stats: Optional[DriftStats]
    level_params: List[List[List[int]]]  # [column][level] -> positions in the flat param list
    alpha_params: List[List[int]]  # [column][level] -> position of alpha_l


def _has_randomness(columns: Sequence[Column]) -> bool:
    return any(getattr(m, "p", 0.0) > 0.0 and m.training for c in columns for m in c.modules())


class ReversibleColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, x: torch.Tensor, *params: torch.Tensor):
        policy = spec.policy
        n = len(spec.columns)
        device = x.device
        ctx.spec = spec
        ctx.autocast = AutocastState.capture(device)
        ctx.rng: Dict[Tuple[int, int], RNGState] = {}
        random = _has_randomness(spec.columns)
        offloader = Offloader(policy.offload_boundaries, device)
        kept: Dict[Tuple[int, int], object] = {}
        k = policy.boundary_interval
        alpha_mins = _alpha_mins(spec.columns)
        tapped = []
        prev: Optional[List[torch.Tensor]] = None
        for j, col in enumerate(spec.columns):
            alphas = col.alphas()
            if prev is not None:
                boundary = k is not None and j % k == 0
                for l in range(4):
                    if boundary or alpha_mins[j][l] < policy.min_reconstruct_alpha:
                        kept[(j, l)] = offloader.stash(prev[l])
            cur: List[torch.Tensor] = []
            for l in range(4):
                if random:
                    ctx.rng[(j, l)] = RNGState.capture(device)
                f = col.level_forward(l, *col.level_inputs(l, x, cur, prev or [None] * 4))
                cur.append(shortcut(alphas[l], None if prev is None else prev[l], f))
            prev = cur
            if j in spec.taps and j != n - 1:
                tapped.append(cur[3])
        ctx.kept = kept
        ctx.offloader = offloader
        ctx.num_params = len(params)
        ctx.param_meta = [(p.requires_grad) for p in params]
        ctx.save_for_backward(x, *params, *prev)
        return (*prev, *tapped)

    @staticmethod
    def backward(ctx, *grad_outputs):
        spec: _Spec = ctx.spec
        saved = ctx.saved_tensors
        x = saved[0]
        params = saved[1 : 1 + ctx.num_params]
        c: List[Optional[torch.Tensor]] = list(saved[1 + ctx.num_params :])
        n = len(spec.columns)
        g: List[Optional[torch.Tensor]] = [
            grad_outputs[l] if grad_outputs[l] is not None else torch.zeros_like(c[l]) for l in range(4)
        ]
        tap_grads = {}
        tap_cols = [j for j in spec.taps if j != n - 1]
        for j, gt in zip(tap_cols, grad_outputs[4:]):
            if gt is not None:
                tap_grads[j] = gt
        param_grads: List[Optional[torch.Tensor]] = [None] * len(params)
        g_x = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
        device = x.device
        drift = None
        checked = 0

        for j in reversed(range(n)):
            col = spec.columns[j]
            if j in tap_grads:
                g[3] = g[3] + tap_grads[j]
            with torch.no_grad():
                alphas = [a.detach() for a in col.alphas()]
            first = j == 0
            prev: List[Optional[torch.Tensor]] = [None] * 4
            g_prev: List[Optional[torch.Tensor]] = [None] * 4
            for l in (3, 2, 1, 0):
                rng = ctx.rng.get((j, l))
                with torch.enable_grad(), ctx.autocast.context():
                    inputs = [t.detach().requires_grad_() for t in col.level_inputs(l, x, c, prev)]
                    if rng is not None:
                        with rng.restored(device):
                            f = col.level_forward(l, *inputs)
                    else:
                        f = col.level_forward(l, *inputs)
                if not first:
                    with torch.no_grad():
                        stash = ctx.kept.pop((j, l), None)
                        if stash is None:
                            prev[l] = invert_shortcut(alphas[l], c[l], f)
                        else:
                            kept_val = ctx.offloader.fetch(stash)
                            rec = invert_shortcut(alphas[l], c[l], f)
                            err = (rec - kept_val).abs().max() / kept_val.abs().max().clamp_min(1e-30)
                            drift = err if drift is None else torch.maximum(drift, err)
                            checked += 1
                            prev[l] = kept_val
                # Backprop through the level: inputs first, then its parameters.
                lp = [i for i in spec.level_params[j][l] if ctx.param_meta[i]]
                wrt = [t for t in inputs] + [params[i] for i in lp]
                grads = torch.autograd.grad(f, wrt, g[l].to(f.dtype), allow_unused=True)
                del f
                gin, gpar = grads[: len(inputs)], grads[len(inputs) :]
                if l == 0:
                    if g_x is not None and gin[0] is not None:
                        g_x = g_x + gin[0]
                else:
                    if gin[0] is not None:
                        g[l - 1] = g[l - 1] + gin[0]
                if len(inputs) >= 2 and gin[1] is not None:
                    g_prev[l + 1] = _acc(g_prev[l + 1], gin[1])
                if len(inputs) == 3 and gin[2] is not None:
                    g_prev[3] = _acc(g_prev[3], gin[2])
                for i, gp in zip(lp, gpar):
                    if gp is not None:
                        param_grads[i] = _acc(param_grads[i], gp)
                # The shortcut: c_l = alpha_l * c_l' + f.
                ai = spec.alpha_params[j][l]
                with torch.no_grad():
                    if first:
                        ga = torch.zeros_like(params[ai])
                    else:
                        ga = (g[l] * prev[l]).sum(dim=(0, 2, 3), keepdim=True).to(params[ai].dtype)
                        g_prev[l] = _acc(g_prev[l], alphas[l] * g[l])
                if ctx.param_meta[ai]:
                    param_grads[ai] = _acc(param_grads[ai], ga)
                c[l] = None
                g[l] = None
            c, g = prev, g_prev
        if spec.stats is not None and drift is not None:
            spec.stats.record(drift.detach(), checked)
        ctx.kept.clear()
        ctx.rng.clear()
        return (None, g_x, *param_grads)


def _acc(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a + b


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
    seg_taps = tuple(sorted(t for t in taps if t < len(seg)))
    params: List[torch.Tensor] = []
    level_params: List[List[List[int]]] = []
    alpha_params: List[List[int]] = []
    for col in seg:
        per_level = []
        for l in range(4):
            ps = list(getattr(col, f"level{l}").parameters())
            per_level.append(list(range(len(params), len(params) + len(ps))))
            params.extend(ps)
        level_params.append(per_level)
        alpha_params.append(list(range(len(params), len(params) + 4)))
        params.extend(getattr(col, f"alpha{l}") for l in range(4))
    spec = _Spec(seg, seg_taps, policy, stats, level_params, alpha_params)
    out = ReversibleColumns.apply(spec, x, *params)
    state, extra = list(out[:4]), list(out[4:])
    tapped: Dict[int, torch.Tensor] = {}
    inner = [t for t in seg_taps if t != len(seg) - 1]
    for t, c3 in zip(inner, extra):
        tapped[t] = c3
    if len(seg) - 1 in seg_taps:
        tapped[len(seg) - 1] = state[3]
    if last_plain:
        state = columns[-1](x, state)
        if n - 1 in taps:
            tapped[n - 1] = state[3]
    return state, tapped
