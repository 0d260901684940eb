"""What the reversible engine keeps and what it reconstructs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class ReversiblePolicy:
    # Keep the column boundary after every k-th column; reconstruct the ones between.
    # None keeps only the segment's outputs (memory constant in the number of columns).
    boundary_interval: Optional[int] = 2
    # Keep the input of any level whose |alpha| is below this: reconstruction divides by
    # alpha, so rounding grows by 1/|alpha| there.
    min_reconstruct_alpha: float = 0.1
    # Run the last m columns with ordinary autograd: their activations are kept, not recomputed.
    plain_columns: int = 1
    # "level": recompute a whole level with grad in backward (one extra forward).
    # "block": recompute the level without grad, keeping each block's input, then each block
    # with grad in turn: only one block's graph is alive (a second extra forward).
    recompute: str = "level"
    # Backpropagate ConvNeXt blocks by hand (lean_block): half the kept maps of autograd in
    # plain columns and recomputed levels, and no autograd call per block.
    lean_blocks: bool = True
    # Levels run with ordinary autograd in every column, their activations kept rather than
    # recomputed: RevCol-T's level 3 holds 20% of a column's FLOPs and 6% of its activations,
    # levels 2-3 60% and 29%.
    keep_levels: Tuple[int, ...] = ()
    # Levels whose lean blocks, where activations are kept (plain columns, keep_levels), drop
    # the MLP hidden map (4C per token) and run pwconv1 again in backward; cheapest where C
    # is small (level 0).
    recompute_hidden: Tuple[int, ...] = (0,)
    # Move kept boundaries to host memory until backward.
    offload_boundaries: bool = False


@dataclass
class DriftStats:
    """Largest relative reconstruction error seen at a kept boundary in the last backward
    (max |reconstructed - kept| / max |kept|). Stays a tensor until read: no sync in backward."""

    _last: Optional[torch.Tensor] = field(default=None, repr=False)
    boundaries_checked: int = 0

    def record(self, drift: torch.Tensor, checked: int) -> None:
        self._last = drift
        self.boundaries_checked = checked

    @property
    def last_drift(self) -> Optional[float]:
        return None if self._last is None else float(self._last)
