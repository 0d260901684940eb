"""Host offload of kept column boundaries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class _Stash:
    host: torch.Tensor
    device: torch.device
    event: Optional[object]  # the copy to the host is done (CUDA)
    back: Optional[torch.Tensor] = None  # the one copy back on the device, once fetched or prefetched
    ready: Optional[object] = None  # the copy back is done (CUDA)


def host_buffer(t: torch.Tensor, pinned: bool) -> torch.Tensor:
    """Host memory for ``t`` with its strides (channels-last stays channels-last): a boundary
    fetched back in another layout sends the recomputation through other kernels, whose
    rounding differs from the forward's (the gradients then differ by ~1e-6 instead of 0)."""
    return torch.empty_like(t, device="cpu", pin_memory=pinned)


class Offloader:
    """stash() moves a tensor to host memory, fetch() brings it back, once: later fetches
    return the same device copy. prefetch() starts the copy back early (the backward calls it
    for the column it will need next), so it overlaps the current column's backward.

    On CUDA the copies run on a side stream into and out of pinned memory, ordered by events
    against the compute stream (no host sync). On CPU the tensor is copied into a separate host
    buffer (the kept value must not alias anything that may be freed or modified later), which
    keeps the path exercised by CPU tests. Disabled, it returns the tensor itself.
    """

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device = device
        self.stream = None
        if enabled and device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
        self.bytes_offloaded = 0
        self.bytes_fetched = 0

    def stash(self, t: torch.Tensor):
        if not self.enabled:
            return t
        self.bytes_offloaded += t.numel() * t.element_size()
        host = host_buffer(t, pinned=self.stream is not None)
        if self.stream is None:
            host.copy_(t)
            return _Stash(host, t.device, None)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)
            event = torch.cuda.Event()
            event.record(self.stream)
        return _Stash(host, t.device, event)

    def prefetch(self, s) -> None:
        """Start the copy back (CUDA: on the side stream, after the copy out)."""
        if not isinstance(s, _Stash) or s.back is not None:
            return
        self.bytes_fetched += s.host.numel() * s.host.element_size()
        if self.stream is None:
            s.back = s.host.to(s.device)
            return
        with torch.cuda.stream(self.stream):  # the copy out ran on this stream: ordered after it
            s.back = s.host.to(s.device, non_blocking=True)
            s.ready = torch.cuda.Event()
            s.ready.record(self.stream)

    def fetch(self, s) -> torch.Tensor:
        if not isinstance(s, _Stash):
            return s
        self.prefetch(s)
        if s.ready is not None:  # the compute stream waits for the copy, the host does not
            current = torch.cuda.current_stream(self.device)
            current.wait_event(s.ready)
            s.back.record_stream(current)  # allocated on the side stream, used on this one
            s.ready = None
        return s.back
