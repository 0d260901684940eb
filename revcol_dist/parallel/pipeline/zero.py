"""ZeRO-1/2 inside a pipeline stage's replica group (DeepSpeed's own pipeline engine stops at
ZeRO-1; torchtitan pairs stages with FSDP2).

The stage's parameters, in model order, are cut into D contiguous runs of about equal size;
replica r owns run r. Only the owner keeps the run's optimizer state and updates it; after the
step one all-gather hands every replica the new weights.

- ``level 1``: the gradients are all-reduced whole, as without ZeRO (every replica keeps them
  until the step); the optimizer states are sharded.
- ``level 2``: each run's gradients are summed on its owner only (one reduce per run), the
  other replicas drop them at once. In the last micro-batch's backward a run is reduced as soon
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
        self.width = max(sum(p.numel() for p in self.params[a:b]) for a, b in self.runs)
        self._pending: List[Optional[comm.Pending]] = []
        self._left: List[int] = []
        self._hooks: list = []
        self.overlapped = 0  # runs whose reduction the last backward launched (level 2)

    def owner_rank(self, name: str) -> int:
        """The global rank that keeps ``name``'s optimizer state."""
        i = self.names.index(name)
        return next(self.ranks[r] for r, (a, b) in enumerate(self.runs) if a <= i < b)

    # ---- gradients ----------------------------------------------------------------------

    def arm(self) -> None:
        """Before the last micro-batch's backward (level 2): reduce each run once its last
        gradient has been accumulated."""
        if self.level != 2:
            return
        self._pending = [None] * self.D
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
        run = self.params[a:b]
        if not run:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in run])
        if r != self.replica:
            for p in run:  # the sum goes to the owner; the copy in ``flat`` is what travels
                p.grad = None
        self._pending[r] = comm.reduce_async(flat, self.ranks[r], self.group)

    def reduce(self) -> None:
        """After the backward: gradients averaged over the replicas, whole everywhere (level 1)
        or on each run's owner only (level 2)."""
        if self.level == 1:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                flat = comm.all_reduce_(torch.cat([g.reshape(-1) for g in grads]), group=self.group)
                flat /= self.D
                for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
                    g.copy_(avg.view_as(g))
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if not self._pending:  # never armed (no backward ran)
            self._pending = [None] * self.D
        for r in range(self.D):  # runs with a parameter that got no gradient in the last backward
            if self._pending[r] is None:
                self._launch(r)
        for r, pending in enumerate(self._pending):
            if pending is None:
                continue
            total = pending.wait()
            if r == self.replica:
                total /= self.D
                a, b = self.runs[r]
                for p, g in zip(self.params[a:b], total.split([p.numel() for p in self.params[a:b]])):
                    p.grad = g.view_as(p)
        self._pending = []

    def norm_divisor(self) -> int:
        """How many replicas hold each gradient: the world sum of squares is divided by it."""
        return self.D if self.level == 1 else 1

    # ---- weights ------------------------------------------------------------------------

    @torch.no_grad()
    def gather_weights(self) -> None:
        """After the step: every replica gets the owners' new weights (one all-gather)."""
        mine = torch.zeros(self.width, dtype=self.params[0].dtype, device=self.params[0].device)
        if self.owned:
            flat = torch.cat([p.detach().reshape(-1) for p in self.owned])
            mine[: flat.numel()] = flat
        every = comm.all_gather_flat(mine, self.group).view(self.D, self.width)
        for r, (a, b) in enumerate(self.runs):
            if r == self.replica:
                continue
            run = self.params[a:b]
            for p, v in zip(run, every[r, : sum(p.numel() for p in run)].split([p.numel() for p in run])):
                p.copy_(v.view_as(p))
