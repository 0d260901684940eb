"""Timing that means the same on a CPU and on a GPU.

On a GPU, work is queued: a host clock around a kernel launch or a NCCL ``wait()`` (which
only makes the compute stream wait) reads almost nothing. ``DeviceTimer`` records CUDA events
on the current stream there and reads them only when asked (at log intervals: the read waits
for the events), and uses the host clock on a CPU, where the work happens at the call."""

from __future__ import annotations

import contextlib
import time
from typing import List, Tuple

import torch


class DeviceTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._host_s = 0.0
        self._events: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def measure(self):
        """Adds the block's time (on the device's stream under CUDA) to the total."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((start, end))
        else:
            t = time.perf_counter()
            try:
                yield
            finally:
                self._host_s += time.perf_counter() - t

    def total_s(self) -> float:
        """Seconds measured since ``reset``; on CUDA this waits for the recorded events."""
        if self._events:
            self._events[-1][1].synchronize()
            self._host_s += sum(a.elapsed_time(b) for a, b in self._events) / 1e3
            self._events = []
        return self._host_s
