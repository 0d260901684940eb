"""A device tensor's values on their way to the host, behind the work queued so far.

Reading a CUDA tensor (``float``, ``.tolist()``) copies on the current stream and waits for all
of it, later work included. A ``HostCopy`` is made right behind the work that computed the
tensor (a non-blocking copy to pinned memory and an event): ``ready()`` asks whether that work
is done without waiting, ``tolist()`` waits for that work only. On a CPU the work is done as it
is queued."""

from __future__ import annotations

from typing import List, Optional

import torch


class HostCopy:
    def __init__(self, t: torch.Tensor, into: Optional[torch.Tensor] = None) -> None:
        """``into``: a host buffer of ``t``'s shape and dtype to reuse (pinned where ``t`` is on a GPU)."""
        self.done: Optional[torch.cuda.Event] = None
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True) if into is None else into
            self.host.copy_(t, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = t.clone() if into is None else into.copy_(t)

    def ready(self) -> bool:
        return self.done is None or self.done.query()

    def tolist(self) -> List:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()
