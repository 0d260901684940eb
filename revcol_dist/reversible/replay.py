"""Replaying the forward's random numbers and autocast state during recomputation."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RNGState:
    cpu: torch.Tensor
    device_type: str
    device_state: Optional[torch.Tensor]

    @classmethod
    def capture(cls, device: torch.device) -> "RNGState":
        dev_state = None
        if device.type == "cuda":
            dev_state = torch.cuda.get_rng_state(device)
        return cls(torch.get_rng_state(), device.type, dev_state)

    @contextlib.contextmanager
    def restored(self, device: torch.device):
        """Run a block with this state, then put the caller's state back."""
        saved = RNGState.capture(device)
        self._set(device)
        try:
            yield
        finally:
            saved._set(device)

    def _set(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.device_state is not None:
            torch.cuda.set_rng_state(self.device_state, device)


@dataclass(frozen=True)
class AutocastState:
    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def capture(cls, device: torch.device) -> "AutocastState":
        dt = device.type
        return cls(dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt))

    def context(self):
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.enabled)
