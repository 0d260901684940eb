"""One RevCol column: four levels joined by reversible alpha shortcuts.

The column is written as plain per-level functions (``level_forward``) so that the
reversible engine can run, invert and recompute one level at a time.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..reversible.coupling import ALPHA_INIT, clamp_alphas, coupling_operands, shortcut
from .layers import ConvNeXtBlock, Conv2d, LayerNorm, LayerNorm2d, Linear

class UpSample(nn.Module):
    """Linear channel change + channels-last LayerNorm, then nearest upsampling to a target size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.channel_reschedule = nn.Sequential(
            Linear(in_channels, out_channels), LayerNorm(out_channels, eps=1e-6)
        )

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = self.channel_reschedule(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        # Resizing to the target size (not by a fixed factor) accepts any input size and is
        # identical to the published x2 / x8 nearest upsample where that one works.
        return F.interpolate(x, size=tuple(size), mode="nearest")


class Fusion(nn.Module):
    def __init__(self, level: int, channels: Sequence[int], first_column: bool, up2: bool) -> None:
        super().__init__()
        self.level = level
        self.first_column = first_column
        if level == 0:
            self.down = nn.Identity()
        else:
            self.down = nn.Sequential(
                Conv2d(channels[level - 1], channels[level], kernel_size=2, stride=2),
                LayerNorm2d(channels[level]),
            )
        self.up = UpSample(channels[level + 1], channels[level]) if (not first_column and level < 3) else None
        self.up2 = UpSample(channels[3], channels[0]) if (not first_column and level == 0 and up2) else None

    def forward(
        self, down_in: torch.Tensor, up_in: Optional[torch.Tensor] = None, up2_in: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        y = self.down(down_in)
        if self.up is not None:
            y = self.up(up_in, y.shape[-2:]) + y
        if self.up2 is not None:
            y = y + self.up2(up2_in, y.shape[-2:])
        return y


class Level(nn.Module):
    def __init__(
        self,
        level: int,
        channels: Sequence[int],
        layers: Sequence[int],
        kernel_size: int,
        first_column: bool,
        drop_path_rates: Sequence[float],
        up2: bool,
    ) -> None:
        super().__init__()
        start = sum(layers[:level])
        self.fusion = Fusion(level, channels, first_column, up2)
        self.blocks = nn.Sequential(
            *[
                ConvNeXtBlock(channels[level], 4 * channels[level], kernel_size, drop_path_rates[start + i])
                for i in range(layers[level])
            ]
        )

    def forward(self, down_in, up_in=None, up2_in=None, run_block=None, couple=None) -> torch.Tensor:
        """The fusion, then the blocks (each through ``run_block`` where given); ``couple``
        (alpha, prev): handed to the last block's runner, whose output is then the coupling
        (a runner with ``couples`` set)."""
        y = self.fusion(down_in, up_in, up2_in)
        if run_block is None:
            return self.blocks(y)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            y = run_block(block, y, couple=couple) if couple is not None and i == last else run_block(block, y)
        return y


class Column(nn.Module):
    """c_l = alpha_l * c_l' + L_l(c_{l-1}, c_{l+1}'), with c_{-1} = stem output x.

    Primes are the previous column's maps; the first column starts from zeros.
    """

    def __init__(
        self,
        channels: Sequence[int],
        layers: Sequence[int],
        kernel_size: int,
        first_column: bool,
        drop_path_rates: Sequence[float],
        up2: bool = False,
    ) -> None:
        super().__init__()
        self.first_column = first_column
        self.up2 = up2
        for l in range(4):
            self.register_parameter(f"alpha{l}", nn.Parameter(torch.full((1, channels[l], 1, 1), ALPHA_INIT)))
        for l in range(4):
            self.add_module(
                f"level{l}", Level(l, channels, layers, kernel_size, first_column, drop_path_rates, up2)
            )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The alphas only (the levels reset their own)."""
        for l in range(4):
            getattr(self, f"alpha{l}").fill_(ALPHA_INIT)

    def alphas(self) -> List[torch.Tensor]:
        """Clamped alphas, the values both the forward and the inverse use."""
        return list(clamp_alphas([getattr(self, f"alpha{l}") for l in range(4)]))

    def level_inputs(self, l: int, x: torch.Tensor, cur: Sequence[torch.Tensor], prev: Sequence[Optional[torch.Tensor]]):
        """Arguments of level l: this column's level l-1 (or x), the previous column's l+1 (and 3 for H)."""
        down = x if l == 0 else cur[l - 1]
        if self.first_column:
            return (down,)
        if l == 3:
            return (down,)
        if l == 0 and self.up2:
            return (down, prev[1], prev[3])
        return (down, prev[l + 1])

    def level_forward(self, l: int, *inputs: torch.Tensor, run_block=None, couple=None) -> torch.Tensor:
        return getattr(self, f"level{l}")(*inputs, run_block=run_block, couple=couple)

    def forward(self, x: torch.Tensor, prev: Optional[Sequence[torch.Tensor]] = None, run_block=None,
                alphas: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
        """Plain autograd forward (the non-reversible path). ``run_block(block, y)`` lets an
        execution engine run the ConvNeXt blocks its own way (default: ``block(y)``); a
        sequence gives one per level. A runner with ``couples`` set also takes a level's last
        block with ``couple=(alpha, prev)`` and returns the coupling alpha * prev + block(y)
        (the same value ``shortcut`` computes, in fewer passes over the map). ``alphas``: the
        four clamped alphas (``alphas()``), where the caller clamped several columns' at once."""
        alphas = self.alphas() if alphas is None else alphas
        runners = run_block if isinstance(run_block, (list, tuple)) else [run_block] * 4
        cur: List[torch.Tensor] = []
        for l in range(4):
            inputs = self.level_inputs(l, x, cur, prev if prev is not None else [None] * 4)
            p = None if prev is None else prev[l]
            if p is not None and getattr(runners[l], "couples", False) and len(getattr(self, f"level{l}").blocks):
                cur.append(self.level_forward(l, *inputs, run_block=runners[l], couple=coupling_operands(alphas[l], p)))
                continue
            f = self.level_forward(l, *inputs, run_block=runners[l])
            cur.append(shortcut(alphas[l], p, f))
        return cur
