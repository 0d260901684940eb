"""A step's loss, terms and skip decision on their way to the host.

Read a step late as device tensors, they would still wait for the next step's forward and
backward queued behind them (reading a CUDA tensor waits for its whole stream); copied right
behind their own step (``reversible.host_copy``), reading waits for that step only."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..parallel.backends import Applied, StepLoss
from ..reversible.host_copy import HostCopy


class StepValues:
    """Step ``step``'s values (``StepLoss`` and whether it applied), readable on the host once
    that step's work is done."""

    def __init__(self, step: int, result: StepLoss, applied: Applied, lr: float) -> None:
        self.step, self.lr = step, lr
        self.names = sorted(result.parts)
        self.host_applied: Optional[bool] = applied if isinstance(applied, bool) else None
        values = [result.loss] + [result.parts[k] for k in self.names]
        if self.host_applied is None:
            values.append(applied)
        self.copy = HostCopy(torch.stack([v.float() for v in values]))  # one kernel, one copy
        self._read: Optional[list] = None

    def _values(self) -> list:
        if self._read is None:
            self._read = self.copy.tolist()  # this step's work only, not what was queued after it
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

