"""A step's loss, terms and skip decision on their way to the host.

Reading a CUDA tensor (``float``, ``bool``) copies on the current stream and waits for that
whole stream: read a step late, it would still wait for the next step's forward and backward
queued behind it. So the values are copied into pinned memory right behind the step's work,
with an event, and reading waits for that event only: the next step's work stays queued."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..parallel.backends import Applied, StepLoss


class StepValues:
    """Step ``step``'s values (``StepLoss`` and whether it applied), readable on the host once
    that step's work is done."""

    def __init__(self, step: int, result: StepLoss, applied: Applied, lr: float) -> None:
        self.step, self.lr, self.result = step, lr, result
        self.names = sorted(result.parts)
        self.host_applied: Optional[bool] = applied if isinstance(applied, bool) else None
        values = [result.loss] + [result.parts[k] for k in self.names]
        if self.host_applied is None:
            values.append(applied)
        stacked = torch.stack([v.float() for v in values])  # one kernel
        self.done: Optional[torch.cuda.Event] = None
        if stacked.device.type == "cuda":
            self.host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            self.host.copy_(stacked, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = stacked  # computed as it was queued
        self._read: Optional[list] = None

    def _values(self) -> list:
        if self._read is None:
            if self.done is not None:
                self.done.synchronize()  # this step's work only, not what was queued after it
            self._read = self.host.tolist()
        return self._read

    @property
    def loss(self) -> float:
        return self._values()[0]

    @property
    def applied(self) -> bool:
        return self.host_applied if self.host_applied is not None else bool(self._values()[-1])

    @property
    def parts(self) -> Dict[str, float]:
        return dict(zip(self.names, self._values()[1 : 1 + len(self.names)]))

