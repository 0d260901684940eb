"""ZeRO-1/2 inside a pipeline stage's replica group (DeepSpeed's own pipeline engine stops at
ZeRO-1; torchtitan pairs stages with FSDP2).

The stage's parameters, in model order, are cut into D contiguous runs of about equal size;
replica r owns run r. Only the owner keeps the run's optimizer state and updates it; after the
step its broadcast hands every replica the new weights.

- ``level 1``: the gradients are all-reduced whole, as without ZeRO (every replica keeps them
  until the step); the optimizer states are sharded.
- ``level 2``: each run's gradients are summed on its owner only (one reduce per run), the
  other replicas drop them at once.

Each run's gradients are views of one flat buffer (``prepare``), reduced in place: no copy. In the last micro-batch's backward a run is reduced as soon
  as its last gradient lands (a hook per parameter), so the reductions overlap the rest of the
  backward: the model's later columns, run D-1, finish first.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import comm


def owner_runs(sizes: Sequence[int], parts: int) -> List[Tuple[int, int]]:
    """[start, stop) of each part's contiguous run of ``sizes``, cut where the running total
    first reaches each part's equal share (a part may be empty where one tensor is larger)."""
    total = sum(sizes)
    runs, start, acc = [], 0, 0
    for r in range(parts):
        stop = start
        target = total * (r + 1) / parts
        while stop < len(sizes) and (r == parts - 1 or acc + sizes[stop] / 2 <= target):
            acc += sizes[stop]
            stop += 1
        runs.append((start, stop))
        start = stop
    return runs


class StageZero:
    """What one replica of a stage owns, and the collectives that keep the replicas equal.
    ``ranks``: the global ranks of the stage's replicas, in replica order."""

    def __init__(self, params: Sequence[torch.nn.Parameter], names: Sequence[str], level: int, group,
                 ranks: Sequence[int], replica: int) -> None:
        if level not in (1, 2):
            raise ValueError(f"pipeline.zero must be 0, 1 or 2, got {level}")
        self.params, self.names, self.level, self.group = list(params), list(names), level, group
        self.ranks, self.replica, self.D = list(ranks), replica, len(ranks)
        self.runs = owner_runs([p.numel() for p in self.params], self.D)
        start, stop = self.runs[replica]
        self.owned = self.params[start:stop]
        self.owned_names = self.names[start:stop]
        self._pending: List[Optional[comm.Pending]] = []
        self._flats: List[Optional[torch.Tensor]] = []
        self._left: List[int] = []
        self._hooks: list = []
        self.overlapped = 0  # runs whose reduction the last backward launched (level 2)

    def owner_rank(self, name: str) -> int:
        """The global rank that keeps ``name``'s optimizer state."""
        i = self.names.index(name)
        return next(self.ranks[r] for r, (a, b) in enumerate(self.runs) if a <= i < b)

    # ---- gradients ----------------------------------------------------------------------

    def prepare(self) -> None:
        """Before the step's first backward: each run's gradients become views of one flat
        buffer (autograd accumulates into an existing .grad in place, as DDP's bucket views), so
        a run is reduced where it lies, without a copy."""
        self._flats = []
        for a, b in self.runs:
            run = self.params[a:b]
            flat = torch.zeros(sum(p.numel() for p in run), dtype=run[0].dtype, device=run[0].device) if run else None
            for p, g in zip(run, flat.split([p.numel() for p in run]) if run else ()):
                p.grad = g.view_as(p)
            self._flats.append(flat)
        self._pending = [None] * self.D

    def arm(self) -> None:
        """Before the last micro-batch's backward (level 2): reduce each run once its last
        gradient has been accumulated."""
        if self.level != 2:
            return
        self._left = [b - a for a, b in self.runs]
        self.overlapped = 0
        for r, (a, b) in enumerate(self.runs):
            for p in self.params[a:b]:
                self._hooks.append(p.register_post_accumulate_grad_hook(lambda _p, r=r: self._landed(r)))

    def _landed(self, r: int) -> None:
        self._left[r] -= 1
        if self._left[r] == 0:
            self._launch(r)
            self.overlapped += 1
        elif self._left[r] < 0:
            raise RuntimeError("a parameter's gradient was accumulated twice in one backward: "
                               "pipeline.zero=2 reduces each run once; use pipeline.zero=1")

    def _launch(self, r: int) -> None:
        a, b = self.runs[r]
        if a == b:
            return
        if r != self.replica:  # the sum goes to the owner: the buffer in flight is all that is left here
            for p in self.params[a:b]:
                p.grad = None
        self._pending[r] = comm.reduce_async(self._flats[r], self.ranks[r], self.group)
        self._flats[r] = None

    def reduce(self) -> None:
        """After the backward: gradients averaged over the replicas, whole everywhere (level 1)
        or on each run's owner only (level 2). A parameter no micro-batch reached has a zero
        gradient here (without pipeline.zero it would have none)."""
        if not getattr(self, "_flats", None):
            raise RuntimeError("StageZero.reduce without prepare(): call it before the step's first backward")
        if self.level == 1:
            for flat in self._flats:
                if flat is not None:
                    comm.all_reduce_(flat, group=self.group).div_(self.D)
            self._flats = []
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for r in range(self.D):  # runs with a parameter the last backward did not reach
            if self._flats[r] is not None:
                self._launch(r)
        for r, pending in enumerate(self._pending):
            if pending is None:
                continue
            total = pending.wait()
            if r == self.replica:
                total.div_(self.D)
                a, b = self.runs[r]
                for p, g in zip(self.params[a:b], total.split([p.numel() for p in self.params[a:b]])):
                    p.grad = g.view_as(p)  # a no-op on the CPU; under NCCL the buffer may be a copy
        self._pending, self._flats = [], []

    def norm_divisor(self) -> int:
        """How many replicas hold each gradient: the world sum of squares is divided by it."""
        return self.D if self.level == 1 else 1

    # ---- weights ------------------------------------------------------------------------

    @torch.no_grad()
    def gather_weights(self) -> None:
        """After the step: every replica gets each owner's new weights (one broadcast per run,
        so the transient is one run's size, not a second copy of the stage)."""
        for r, (a, b) in enumerate(self.runs):
            run = self.params[a:b]
            if not run:
                continue
            flat = torch.cat([p.detach().reshape(-1) for p in run])
            comm.broadcast_(flat, self.ranks[r], self.group)
            if r != self.replica:
                for p, v in zip(run, flat.split([p.numel() for p in run])):
                    p.copy_(v.view_as(p))
