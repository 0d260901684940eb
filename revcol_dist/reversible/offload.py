"""Host offload of kept column boundaries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class _Stash:
    host: torch.Tensor
    device: torch.device
    event: Optional[object]


class Offloader:
    """stash() moves a tensor to host memory, fetch() brings it back.

    On CUDA the copy goes to pinned memory on a side stream, ordered after the producing
    stream by an event, so it overlaps the following columns' compute. On CPU the tensor is
    copied into a separate host buffer (the kept value must not alias anything that may be
    freed or modified later), which keeps the path exercised by CPU tests.
    Disabled, it returns the tensor itself.
    """

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device = device
        self.stream = None
        if enabled and device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
        self.bytes_offloaded = 0

    def stash(self, t: torch.Tensor):
        if not self.enabled:
            return t
        self.bytes_offloaded += t.numel() * t.element_size()
        if self.stream is None:
            return _Stash(t.detach().to("cpu", copy=True), t.device, None)
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)
            event = torch.cuda.Event()
            event.record(self.stream)
        return _Stash(host, t.device, event)

    def fetch(self, s) -> torch.Tensor:
        if not isinstance(s, _Stash):
            return s
        if s.event is not None:
            s.event.synchronize()
        return s.host.to(s.device, non_blocking=s.event is not None)
