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
    first reaches each part's equal share; every part gets at least one tensor (an owner of
    nothing would have no optimizer)."""
    if len(sizes) < parts:
        raise ValueError(f"a stage with {len(sizes)} parameters cannot be shared by {parts} replicas: use "
                         f"pipeline.zero=0 or fewer replicas")
    total = sum(sizes)
    runs, start, acc = [], 0, 0
    for r in range(parts):
        stop, target = start, total * (r + 1) / parts
        last_allowed = len(sizes) - (parts - r - 1)  # leave one tensor for each later part
        while stop < last_allowed and (stop == start or r == parts - 1 or acc + sizes[stop] / 2 <= target):
            acc += sizes[stop]
            stop += 1
        runs.append((start, stop))
        start = stop
    return runs


def _grad_view(flat: torch.Tensor, offset: int, p: torch.Tensor) -> torch.Tensor:
    """Elements [offset, offset + p.numel()) of ``flat`` with ``p``'s strides (channels_last
    weights too): the layout AccumulateGrad and the optimizer expect."""
    return flat.as_strided(p.shape, p.stride(), flat.storage_offset() + offset)


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
        a run is reduced where it lies, without a copy. A hook per parameter notes which ones a
        backward reaches, and in the last micro-batch (``arm``) when a run is complete."""
        self._remove_hooks()
        self._flats, self._pending = [], [None] * self.D
        for a, b in self.runs:
            run = self.params[a:b]
            flat = torch.zeros(sum(p.numel() for p in run), dtype=run[0].dtype, device=run[0].device)
            offset = 0
            for p in run:
                p.grad = _grad_view(flat, offset, p)
                offset += p.numel()
            self._flats.append(flat)
        self._reached = [False] * len(self.params)
        self._armed, self._next = False, self.D - 1
        self._run_of = [r for r, (a, b) in enumerate(self.runs) for _ in range(a, b)]
        for i, p in enumerate(self.params):
            self._hooks.append(p.register_post_accumulate_grad_hook(lambda _p, i=i: self._landed(i)))

    def arm(self) -> None:
        """Before the last micro-batch's backward (level 2): reduce each run once its last
        gradient has been accumulated."""
        if self.level != 2:
            return
        self._left = [b - a for a, b in self.runs]
        self._ready = [False] * self.D
        self.overlapped = 0
        self._armed = True

    def _landed(self, i: int) -> None:
        self._reached[i] = True
        if not self._armed:
            return
        r = self._run_of[i]
        self._left[r] -= 1
        if self._left[r] < 0:
            raise RuntimeError("a parameter's gradient was accumulated twice in one backward: "
                               "pipeline.zero=2 reduces each run once; use pipeline.zero=1")
        if self._left[r] == 0:
            self._ready[r] = True
            # every replica issues the reduces in one fixed order (the last run first), as NCCL
            # needs; a run ready early waits for the later ones
            while self._next >= 0 and self._ready[self._next]:
                self._launch(self._next)
                self.overlapped += 1
                self._next -= 1

    def _launch(self, r: int) -> None:
        a, b = self.runs[r]
        if r != self.replica:  # the sum goes to the owner: the buffer in flight is all that is left here
            for p in self.params[a:b]:
                p.grad = None
        self._pending[r] = comm.reduce_async(self._flats[r], self.ranks[r], self.group)
        self._flats[r] = None

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def reduce(self) -> None:
        """After the backward: gradients averaged over the replicas, whole everywhere (level 1)
        or on each run's owner only (level 2). A parameter no micro-batch reached on any replica
        gets no gradient, as without ZeRO (so the optimizer skips it). Which ones a backward
        reaches is the graph's structure, the same on every replica: the hooks tell each
        replica on the host, with no collective and no sync."""
        if not self._flats:
            raise RuntimeError("StageZero.reduce without prepare(): call it before the step's first backward")
        self._remove_hooks()
        if self.level == 1:
            for flat in self._flats:
                comm.all_reduce_(flat, group=self.group).div_(self.D)
        else:
            while self._next >= 0:  # the runs the last backward did not complete, in the same order
                self._launch(self._next)
                self._next -= 1
            a, b = self.runs[self.replica]
            total = self._pending[self.replica].wait()
            for r, pending in enumerate(self._pending):
                if r != self.replica:
                    pending.wait()
            total.div_(self.D)
            offset = 0
            for p in self.params[a:b]:
                p.grad = _grad_view(total, offset, p)  # the same storage on the CPU; NCCL may hand a copy
                offset += p.numel()
        self._pending, self._flats, self._armed = [], [], False
        for p, hit in zip(self.params, self._reached):
            if not hit:
                p.grad = None

    def norm_divisor(self) -> int:
        """How many replicas hold each gradient: the world sum of squares is divided by it."""
        return self.D if self.level == 1 else 1

    # ---- weights ------------------------------------------------------------------------

    @torch.no_grad()
    def gather_weights(self) -> None:
        """After the step: every replica gets each owner's new weights (one broadcast per run,
        so the transient is one run's size, not a second copy of the stage)."""
        for r, (a, b) in enumerate(self.runs):  # never empty (owner_runs)
            run = self.params[a:b]
            flat = torch.cat([p.detach().reshape(-1) for p in run])
            comm.broadcast_(flat, self.ranks[r], self.group)
            if r != self.replica:
                for p, v in zip(run, flat.split([p.numel() for p in run])):
                    p.copy_(v.view_as(p))
