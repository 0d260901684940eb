"""Which columns each stage runs, chosen by measured cost: parameter counts, or FLOPs counted
by running the model once. The stem goes with column 0, each classifier head and decoder with
the column it reads."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch


def column_modules(model) -> List[List[torch.nn.Module]]:
    """Modules whose cost a column carries: itself, its heads/decoders, the stem (column 0)."""
    cfg = model.config
    parts: List[List[torch.nn.Module]] = [[c] for c in model.columns]
    parts[0].append(model.stem)
    if cfg.inter_supv:
        for h, col in enumerate(cfg.head_columns[:-1]):
            parts[col] += [model.heads[h], model.decoders[h]]
    parts[-1].append(model.heads[-1])  # the final classifier reads the last column
    return parts


def column_costs(model, by: str = "params", res: int = 224) -> List[float]:
    parts = column_modules(model)
    if by == "params":
        return [float(sum(p.numel() for m in mods for p in m.parameters())) for mods in parts]
    if by != "flops":
        raise ValueError(f"partition cost must be 'params' or 'flops', got {by!r}")
    from torch.utils.flop_counter import FlopCounterMode

    names = {m: n for n, m in model.named_modules()}
    was_training, was_rev = model.training, model.reversible
    model.train()  # heads and decoders of intermediate supervision run in training mode only
    model.reversible = False
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, 3, res, res, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        model.reversible = was_rev
    counts = counter.get_flop_counts()
    top = type(model).__name__

    def flops(m) -> float:
        return float(sum(counts.get(f"{top}.{names[m]}", {}).values()))

    return [sum(flops(m) for m in mods) for mods in parts]


def partition_columns(costs: List[float], stages: int) -> List[List[int]]:
    """Contiguous split of the columns into ``stages`` groups minimising the largest group's cost."""
    n = len(costs)
    if stages >= n:
        return [[i] for i in range(n)] + [[] for _ in range(stages - n)]
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    best = {}

    def solve(i: int, s: int):  # columns i.. into s stages -> (max cost, cuts)
        if (i, s) in best:
            return best[(i, s)]
        if s == 1:
            res = (prefix[n] - prefix[i], [n])
        else:
            res = (math.inf, [])
            for j in range(i + 1, n - s + 2):
                rest, cuts = solve(j, s - 1)
                cost = max(prefix[j] - prefix[i], rest)
                if cost < res[0]:
                    res = (cost, [j] + cuts)
        best[(i, s)] = res
        return res

    _, cuts = solve(0, stages)
    groups, start = [], 0
    for end in cuts:
        groups.append(list(range(start, end)))
        start = end
    return groups


def split_columns(model, stages: int, by: str = "params", res: int = 224) -> Tuple[List[List[int]], List[float]]:
    """(columns of each stage, cost of each column)."""
    n = len(model.columns)
    if not 1 <= stages <= n:
        raise ValueError(f"{stages} pipeline stages for {n} columns: use 1 to {n} stages")
    costs = column_costs(model, by, res)
    return partition_columns(costs, stages), costs


def partition_table(groups: Sequence[Sequence[int]], costs: Sequence[float], by: str) -> str:
    total = sum(costs)
    lines = [f"pipeline partition by {by} ({len(groups)} stages):"]
    for s, cols in enumerate(groups):
        c = sum(costs[i] for i in cols)
        extra = (["stem"] if 0 in cols else []) + (["final head"] if len(costs) - 1 in cols else [])
        lines.append(f"  stage {s}: columns {cols[0]}-{cols[-1]}{' + ' + ', '.join(extra) if extra else ''}"
                     f"  {c:,.0f} ({100 * c / total:.1f}%)")
    return "\n".join(lines)
