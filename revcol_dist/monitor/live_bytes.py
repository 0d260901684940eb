"""Peak bytes of live tensor storage, measured by watching every op's outputs.

A TorchDispatchMode sees each tensor an op creates (forward, backward, recomputation and
the reversible engine's own work alike); a storage counts until its last reference dies.
Works on any device; on CPU it is the only precise peak-memory measure available. Deaths are
collected lazily: the running count is an upper bound of the live bytes, swept exact only when it
passes the peak, so the peak is exact and most ops cost no sweep.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = {}  # storage key -> (weak ref, bytes)
        self.counted = 0  # bytes of the storages recorded: live ones, and dead ones not yet swept
        self.peak = 0

    @property
    def current(self) -> int:
        """Live bytes now (exact: sweeps the dead)."""
        self._sweep()
        return self.counted

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.counted -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {
            (t.untyped_storage().data_ptr(), t.device)
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = (st.data_ptr(), st.device)
                old = self.live.get(key)
                if old is not None and old[0].expired():  # died, not yet swept: its address is reused
                    self.counted -= self.live.pop(key)[1]
                # In-place ops and views return storage that already existed: not new memory.
                if key not in self.live and key not in inputs and st.nbytes() > 0:
                    self.live[key] = (StorageWeakRef(st), st.nbytes())
                    self.counted += st.nbytes()
        if self.counted > self.peak:  # an upper bound of the live bytes: swept exact only where it
            self.peak = max(self.peak, self.current)  # could be a new peak (a sweep per op cost O(live))
        return out
