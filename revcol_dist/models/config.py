"""The hyper-parameters of one RevCol variant, as one dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

from ..reversible.policy import ReversiblePolicy


@dataclass(frozen=True)
class RevColConfig(ReversiblePolicy):
    """Architecture fields here; the reversible engine's memory policy fields are inherited
    (keyword-only) from ``ReversiblePolicy``, their one definition."""

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
    # Recompute intermediate-supervision heads/decoders in backward instead of storing them.
    checkpoint_heads: bool = True
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        super().__post_init__()
        problems = self.policy_problems()
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
        if self.plain_columns > self.num_columns:
            problems.append(f"plain_columns must be in [0, num_columns={self.num_columns}], got {self.plain_columns}")
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
