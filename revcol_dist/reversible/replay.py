"""Replaying the forward's random numbers and autocast state during recomputation."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from .. import randomness


@dataclass
class RNGState:
    """torch's generators, or (inside ``randomness.keyed``) the sample keys the forward drew with."""
    cpu: Optional[torch.Tensor]
    device_type: str
    device_state: Optional[torch.Tensor]
    keys: Optional[randomness.SampleKeys] = None

    @classmethod
    def capture(cls, device: torch.device) -> "RNGState":
        keys = randomness.current()
        if keys is not None:  # keyed draws: the keys replay them (no generator state to copy)
            return cls(None, device.type, None, keys)
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
        randomness.set_current(self.keys)
        if self.cpu is not None:
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
