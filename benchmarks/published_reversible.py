"""A re-implementation of the published per-column reversible approach, for comparison only.

Each column is its own autograd Function that saves its outputs; backward reconstructs the
column's inputs level by level and writes parameter gradients as a side effect
(``torch.autograd.backward``), since parameters are not Function inputs.
"""

from __future__ import annotations

import torch

from revcol_dist.reversible.coupling import invert_shortcut, shortcut


class _PublishedColumn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, col, x, *prev):
        first = col.first_column
        prev_l = None if first else list(prev)
        alphas = col.alphas()
        cur = []
        ctx.rng = []
        for l in range(4):
            ctx.rng.append(torch.get_rng_state())
            f = col.level_forward(l, *col.level_inputs(l, x, cur, prev_l or [None] * 4))
            cur.append(shortcut(alphas[l], None if first else prev_l[l], f))
        ctx.col = col
        ctx.save_for_backward(x, *cur)
        return tuple(cur)

    @staticmethod
    def backward(ctx, *g):
        col = ctx.col
        x, *c = ctx.saved_tensors
        g = [gi.clone() for gi in g]
        first = col.first_column
        alphas = [a.detach() for a in col.alphas()]
        prev = [None] * 4
        g_prev = [torch.zeros_like(ci) for ci in c]
        g_x = torch.zeros_like(x)
        for l in (3, 2, 1, 0):
            inputs = [t.detach().requires_grad_() for t in col.level_inputs(l, x, c, prev)]
            saved = torch.get_rng_state()
            torch.set_rng_state(ctx.rng[l])
            with torch.enable_grad():
                f = col.level_forward(l, *inputs)
                if not first:
                    alpha = col.alphas()[l]
                    with torch.no_grad():
                        prev[l] = invert_shortcut(alphas[l], c[l], f).requires_grad_()
                    out = alpha * prev[l] + f
                else:
                    out = f + col.alphas()[l] * 0.0
                torch.autograd.backward(out, g[l])  # parameter gradients by side effect
            torch.set_rng_state(saved)
            if l == 0:
                g_x += inputs[0].grad
            else:
                g[l - 1] += inputs[0].grad
            if len(inputs) > 1:
                g_prev[l + 1] += inputs[1].grad
            if len(inputs) > 2:
                g_prev[3] += inputs[2].grad
            if not first:
                g_prev[l] += prev[l].grad
        if first:
            return (None, g_x, None, None, None, None)
        return (None, g_x, *g_prev)


def run_published(columns, x, taps=()):
    state = (torch.zeros(()),) * 4
    tapped = {}
    for i, col in enumerate(columns):
        state = _PublishedColumn.apply(col, x, *state)
        if i in taps:
            tapped[i] = state[3]
    return list(state), tapped
