"""Classifier heads and the image decoders of intermediate supervision."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ConvNeXtBlock, Conv2d, LayerNorm, LayerNorm2d, Linear


class Classifier(nn.Module):
    """Global average pool -> LayerNorm -> Linear."""

    def __init__(self, channels: int, num_classes: int, init_scale: Optional[float] = None) -> None:
        super().__init__()
        self.classifier = nn.Sequential(LayerNorm(channels, eps=1e-6), Linear(channels, num_classes))
        if init_scale:  # now, and whenever the Linear is initialised again (models/init.py)
            head = self.classifier[1]
            head.init_scale = init_scale
            with torch.no_grad():
                head.weight.mul_(init_scale)
                head.bias.mul_(init_scale)

    def forward(self, c3: torch.Tensor) -> torch.Tensor:
        return self.classifier(c3.mean(dim=(2, 3)))


class Decoder(nn.Module):
    """Reconstructs the image from c3: three (1x1 conv, LN, GELU, bilinear up, ConvNeXt) stages
    through C3 -> C2 -> C1 -> C0, then a 1x1 conv to 48 channels and PixelShuffle(4)."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        dims = list(reversed(channels))
        self.proj_layers = nn.ModuleList(
            nn.Sequential(Conv2d(dims[i - 1], dims[i], 1), LayerNorm2d(dims[i]), nn.GELU()) for i in range(1, 4)
        )
        self.normal_layers = nn.ModuleList(
            nn.Sequential(ConvNeXtBlock(dims[i], dims[i], kernel_size=3)) for i in range(1, 4)
        )
        self.projback = nn.Sequential(Conv2d(dims[-1], 4 * 4 * 3, 1), nn.PixelShuffle(4))

    def forward(self, c3: torch.Tensor, sizes: Sequence[Sequence[int]], image_size: Sequence[int]) -> torch.Tensor:
        """sizes: spatial sizes of the c2, c1, c0 maps (the published x2 where sizes allow)."""
        x = c3
        for i, size in enumerate(sizes):
            x = self.stage(i, x, size)
        return self.output(x, image_size)

    def stage(self, i: int, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """One C_{l+1} -> C_l step (separately recomputable)."""
        x = F.interpolate(self.proj_layers[i](x), size=tuple(size), mode="bilinear", align_corners=True)
        return self.normal_layers[i](x)

    def output(self, x: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        return _to_size(self.projback(x), image_size)


class SimDecoder(nn.Module):
    """The 22K decoder: LayerNorm -> 1x1 conv to 32*32*3 -> PixelShuffle(32)."""

    def __init__(self, channels: int, stride: int = 32) -> None:
        super().__init__()
        self.projback = nn.Sequential(LayerNorm2d(channels), Conv2d(channels, stride * stride * 3, 1), nn.PixelShuffle(stride))

    def forward(self, c3: torch.Tensor, sizes: Sequence[Sequence[int]], image_size: Sequence[int]) -> torch.Tensor:
        return _to_size(self.projback(c3), image_size)


def _to_size(img: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Input sizes that are not multiples of 32 give a slightly smaller map: resize to the image."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img, size=tuple(size), mode="bilinear", align_corners=False)
