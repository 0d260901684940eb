"""The hyper-parameters of one RevCol variant, as one dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple


@dataclass(frozen=True)
class RevColConfig:
    channels: Tuple[int, int, int, int]
    layers: Tuple[int, int, int, int]
    num_columns: int
    kernel_size: int = 3
    drop_path: float = 0.0
    num_classes: int = 1000
    inter_supv: bool = False
    reversible: bool = True
    # RevCol-H: level 0 also fuses the previous column's level-3 map (nearest x8 upsample).
    level0_up2: bool = False
    # Scales the (deploy) head's initial weights; the published fine-tunes use 0.001 for L/XL/H.
    head_init_scale: Optional[float] = None
    # Reversible memory policy: keep every k-th column boundary, reconstruct the others
    # (None: keep only the last). k=2 measured: gradients within 2.3e-6 of plain autograd on
    # RevCol-S (k=4: 4.9e-5, None: 2.6e-3), boundary memory half of the published approach.
    boundary_interval: Optional[int] = 2
    # Keep (rather than reconstruct) a level whose |alpha| falls below this (numerical safety).
    min_reconstruct_alpha: float = 0.1
    # Recompute intermediate-supervision heads/decoders in backward instead of storing them.
    checkpoint_heads: bool = True
    # Copy kept boundaries to host memory (pinned + side stream on CUDA).
    offload_boundaries: bool = False
    # Run the last m columns with ordinary autograd: their activations are kept instead of
    # recomputed (1: faster; 0: lowest memory; 2 on RevCol-T: fastest).
    plain_columns: int = 1
    # Recompute granularity in backward: "level" (one extra forward) or "block" (keeps only
    # one ConvNeXt block's graph alive; a second extra forward of the blocks).
    recompute: str = "level"
    # Backpropagate ConvNeXt blocks by hand (reversible/lean_block.py): six channel-sized
    # maps kept per block instead of autograd's twelve, no per-block autograd call.
    lean_blocks: bool = True
    # Levels whose activations are kept in every column instead of recomputed (speed for
    # memory that grows with columns; e.g. (3,) or (2, 3)). RevCol-T/S register (3,): there it
    # is faster than the published approach within its memory; with 16 columns (RevCol-B) or
    # wide deep levels (RevCol-L) it is not. Not applied under ZeRO-3 or a pipeline stage.
    keep_levels: Tuple[int, ...] = ()
    # Levels whose blocks, where their activations are kept (plain columns, keep_levels),
    # keep no MLP hidden map (4C per token) and run pwconv1 again in backward: cheapest at
    # level 0 (fewest channels), whose hidden maps are ~30% of a kept RevCol-T column.
    recompute_hidden: Tuple[int, ...] = (0,)
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        for levels in ("keep_levels", "recompute_hidden"):
            object.__setattr__(self, levels, tuple(sorted(set(int(l) for l in getattr(self, levels)))))
        problems = []
        if len(self.channels) != 4 or any(c <= 0 for c in self.channels):
            problems.append(f"channels must be 4 positive ints, got {self.channels}")
        if len(self.layers) != 4 or any(n < 1 for n in self.layers):
            problems.append(f"layers must be 4 ints >= 1, got {self.layers}")
        if self.num_columns < 1:
            problems.append(f"num_columns must be >= 1, got {self.num_columns}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            problems.append(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if not 0.0 <= self.drop_path < 1.0:
            problems.append(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if self.boundary_interval is not None and self.boundary_interval < 1:
            problems.append(f"boundary_interval must be >= 1 or None, got {self.boundary_interval}")
        if not 0 <= self.plain_columns <= self.num_columns:
            problems.append(f"plain_columns must be in [0, num_columns={self.num_columns}], got {self.plain_columns}")
        if self.recompute not in ("level", "block"):
            problems.append(f"recompute must be 'level' or 'block', got {self.recompute!r}")
        for levels in ("keep_levels", "recompute_hidden"):
            if any(not 0 <= l <= 3 for l in getattr(self, levels)):
                problems.append(f"{levels} must be levels 0..3, got {getattr(self, levels)}")
        if self.min_reconstruct_alpha < 0:
            problems.append(f"min_reconstruct_alpha must be >= 0, got {self.min_reconstruct_alpha}")
        if problems:
            raise ValueError(f"invalid RevCol config ({self.name}): " + "; ".join(problems))

    @property
    def supv_interval(self) -> int:
        """Columns between intermediate heads (published: num_columns // 4)."""
        return max(1, self.num_columns // 4)

    @property
    def head_columns(self) -> Tuple[int, ...]:
        """Columns followed by a classifier head when inter_supv is on (the last one included)."""
        k = self.supv_interval
        return tuple(i for i in range(self.num_columns) if (i + 1) % k == 0)

    def drop_path_rates(self) -> Tuple[float, ...]:
        """linspace(0, drop_path, sum(layers)), indexed by block position within a column."""
        import torch  # float32 linspace, as published, so the rates match bit for bit

        return tuple(float(r) for r in torch.linspace(0, self.drop_path, sum(self.layers), device="cpu").tolist())

    def replace(self, **overrides) -> "RevColConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(
                f"unknown RevCol option(s) {unknown}; valid options: {sorted(known - {'name'})}"
            )
        return dataclasses.replace(self, **overrides)
