"""A value that compiled FFCV code reads at run time: the epoch.

numba freezes every global and closure variable into the compiled code, so an epoch captured
by the crop decoder's code is a constant, and changing it meant recompiling FFCV's whole
pipeline (3-20 s at every epoch). Here the code captures the address of a one-element array
instead and reads it each batch; the stream writes it before each epoch starts."""

from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _as_pointer(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@njit(nogil=True, cache=True)
def read_int(address):
    """The int64 at ``address`` (a ``RuntimeInt.address``)."""
    return carray(_as_pointer(address), (1,), np.int64)[0]


class RuntimeInt:
    """An int64 with a fixed address; keep the object alive as long as the code reading it."""

    def __init__(self, value: int = 0) -> None:
        self._cell = np.full(1, value, dtype=np.int64)
        self.address = int(self._cell.ctypes.data)

    @property
    def value(self) -> int:
        return int(self._cell[0])

    @value.setter
    def value(self, v: int) -> None:
        self._cell[0] = v
