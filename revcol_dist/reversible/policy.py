"""What the reversible engine keeps and what it reconstructs: declared once, here. A model's
``RevColConfig`` inherits these fields, so ``create_model(..., boundary_interval=4)`` and
``--set model.args.boundary_interval=4`` set them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True, kw_only=True)
class ReversiblePolicy:
    # Keep the column boundary after every k-th column; reconstruct the ones between.
    # None keeps only the segment's outputs (memory constant in the number of columns).
    # k=2 measured: gradients within 2.3e-6 of plain autograd on RevCol-S (k=4: 4.9e-5,
    # None: 2.6e-3), boundary memory half of the published approach.
    boundary_interval: Optional[int] = 2
    # Keep the input of any level whose |alpha| is below this: reconstruction divides by
    # alpha, so rounding grows by 1/|alpha| there.
    min_reconstruct_alpha: float = 0.1
    # Run the last m columns with ordinary autograd: their activations are kept, not
    # recomputed (1: faster; 0: lowest memory; 2 on RevCol-T: fastest).
    plain_columns: int = 1
    # "level": recompute a whole level with grad in backward (one extra forward).
    # "block": recompute the level without grad, keeping each block's input, then each block
    # with grad in turn: only one block's graph is alive (a second extra forward).
    recompute: str = "level"
    # Backpropagate ConvNeXt blocks by hand (lean_block): six channel-sized maps kept per
    # block instead of autograd's twelve, and no autograd call per block.
    lean_blocks: bool = True
    # Levels run with ordinary autograd in every column, their activations kept rather than
    # recomputed (speed for memory that grows with columns): RevCol-T's level 3 holds 20% of a
    # column's FLOPs and 6% of its activations, levels 2-3 60% and 29%. RevCol-T/S register
    # (3,); with 16 columns (RevCol-B) or wide deep levels (RevCol-L) it does not pay. Not
    # applied under ZeRO-3 or in a pipeline stage.
    keep_levels: Tuple[int, ...] = ()
    # Levels whose lean blocks, where activations are kept (plain columns, keep_levels), drop
    # the MLP hidden map (4C per token) and run pwconv1 again in backward; cheapest where C
    # is small (level 0, whose hidden maps are ~30% of a kept RevCol-T column).
    recompute_hidden: Tuple[int, ...] = (0,)
    # Move kept boundaries to host memory until backward (pinned, side stream on CUDA).
    offload_boundaries: bool = False

    def __post_init__(self) -> None:
        for levels in ("keep_levels", "recompute_hidden"):
            object.__setattr__(self, levels, tuple(sorted(set(int(l) for l in getattr(self, levels)))))

    def policy_problems(self) -> List[str]:
        """What is wrong with these fields (empty: nothing)."""
        problems = []
        if self.boundary_interval is not None and self.boundary_interval < 1:
            problems.append(f"boundary_interval must be >= 1 or None, got {self.boundary_interval}")
        if self.plain_columns < 0:
            problems.append(f"plain_columns must be >= 0, got {self.plain_columns}")
        if self.recompute not in ("level", "block"):
            problems.append(f"recompute must be 'level' or 'block', got {self.recompute!r}")
        for levels in ("keep_levels", "recompute_hidden"):
            if any(not 0 <= l <= 3 for l in getattr(self, levels)):
                problems.append(f"{levels} must be levels 0..3, got {getattr(self, levels)}")
        if self.min_reconstruct_alpha < 0:
            problems.append(f"min_reconstruct_alpha must be >= 0, got {self.min_reconstruct_alpha}")
        return problems

    def policy(self) -> "ReversiblePolicy":
        """Only the policy's own fields (a model config carries more)."""
        if type(self) is ReversiblePolicy:
            return self
        return ReversiblePolicy(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ReversiblePolicy)})


@dataclass
class DriftStats:
    """Largest relative reconstruction error seen at a kept boundary in the last backward
    (max |reconstructed - kept| / max |kept|). Kept as the checks' tensors until read: no sync
    in backward, and no division or running maximum per check (computed once, when read)."""

    _last: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = field(default=None, repr=False)
    boundaries_checked: int = 0

    def record(self, checks: List[Tuple[torch.Tensor, torch.Tensor]], checked: int) -> None:
        """``checks``: (max |error|, max |kept|) per boundary, the list the backward appends to."""
        self._last = checks
        self.boundaries_checked = checked

    @property
    def last_drift(self) -> Optional[float]:
        return None if not self._last else float(drift_of(self._last))


def drift_of(checks: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """max over the checks of error / scale (0-d tensor, on the checks' device)."""
    errors, scales = torch.stack([e for e, _ in checks]), torch.stack([s for _, s in checks])
    return (errors / scales.clamp_min(torch.finfo(scales.dtype).tiny)).max()
