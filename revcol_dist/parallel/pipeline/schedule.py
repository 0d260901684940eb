"""The 1F1B order of forward and backward passes per stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple


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


@dataclass(frozen=True)
class Transfer:
    """One point-to-point message: a micro-batch's activations (to the next stage) or their
    gradients (to the stage before)."""
    kind: str  # "act" | "grad"
    micro: int

    @property
    def towards(self) -> int:
        """+1: to the next stage; -1: to the one before."""
        return 1 if self.kind == "act" else -1


@dataclass(frozen=True)
class Slot:
    """What a stage does at one point of its step: one batch of transfers (the previous
    action's outputs out, this action's inputs in), then the action (None after the last)."""
    sends: Tuple[Transfer, ...]
    recvs: Tuple[Transfer, ...]
    action: Optional[Tuple[str, int]]


def p2p_slots(stage: int, stages: int, micro: int) -> List[Slot]:
    """1F1B with its point-to-point traffic batched per slot: the outputs of each forward or
    backward leave in the same batch that brings the next action's inputs (in the steady
    state: send-forward with receive-backward, send-backward with receive-forward). NCCL runs
    a batch as one group, so the two directions between neighbours never wait on each
    other's order; the rendezvous simulation in the tests checks every (stages, micro)."""
    first, last = stage == 0, stage == stages - 1

    def outputs(kind: str, m: int) -> Tuple[Transfer, ...]:
        if kind == "F":
            return () if last else (Transfer("act", m),)
        return () if first else (Transfer("grad", m),)

    def inputs(kind: str, m: int) -> Tuple[Transfer, ...]:
        if kind == "F":
            return () if first else (Transfer("act", m),)
        return () if last else (Transfer("grad", m),)

    slots, previous = [], ()
    for kind, m in one_f_one_b(stage, stages, micro):
        slots.append(Slot(previous, inputs(kind, m), (kind, m)))
        previous = outputs(kind, m)
    slots.append(Slot(previous, (), None))
    return slots
