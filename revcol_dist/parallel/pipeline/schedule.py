"""The 1F1B order of forward and backward passes per stage."""

from __future__ import annotations

from typing import List, Tuple


def one_f_one_b(stage: int, stages: int, micro: int) -> List[Tuple[str, int]]:
    """Stage s runs S-s-1 warm-up forwards, then alternates forward/backward, then drains:
    at most S-s micro-batches are in flight on it, whatever the number of micro-batches."""
    if not 0 <= stage < stages or micro < 1:
        raise ValueError(f"stage {stage} of {stages} with {micro} micro-batches")
    warm = min(stages - stage - 1, micro)
    actions = [("F", m) for m in range(warm)]
    f, b = warm, 0
    while f < micro:
        actions += [("F", f), ("B", b)]
        f, b = f + 1, b + 1
    actions += [("B", m) for m in range(b, micro)]
    return actions


def max_in_flight(stage: int, stages: int, micro: int) -> int:
    live, peak = 0, 0
    for kind, _ in one_f_one_b(stage, stages, micro):
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def bubble_fraction(stages: int, micro: int) -> float:
    """Idle share of a 1F1B step with equal stages: (S-1)/(M+S-1)."""
    return (stages - 1) / (micro + stages - 1)
