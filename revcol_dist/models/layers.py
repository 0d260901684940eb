"""Building blocks shared by columns, heads and decoders.

Written here rather than imported from timm/torchvision (neither imports beside the CPU
torch build this project pins). Linear and Conv2d initialise themselves in
``reset_parameters`` so that the published init (truncated normal, std .02, zero bias)
happens inside the module's own constructor: under ``deepspeed.zero.Init`` a parameter is
partitioned as soon as its module is built, so an init pass afterwards would be lost.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

INIT_STD = 0.02


class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Conv2d(nn.Conv2d):
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW tensor (the published "channels_first")."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Per-sample stochastic depth; draws from the global RNG so reversible replay can
    restore the exact mask by restoring the RNG state."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ConvNeXtBlock(nn.Module):
    """dwconv -> LN -> Linear(C, hidden) -> GELU -> Linear(hidden, C) -> layer scale -> drop path,
    residual. Parameter names follow the released checkpoints."""

    def __init__(
        self,
        channels: int,
        hidden: int,
        kernel_size: int = 3,
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-6,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd to keep the spatial size, got {kernel_size}")
        self.dwconv = Conv2d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = Linear(channels, hidden)
        self.act = nn.GELU()
        self.pwconv2 = Linear(hidden, channels)
        self.gamma = nn.Parameter(torch.full((channels,), layer_scale_init))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        return x + self.drop_path(y)
