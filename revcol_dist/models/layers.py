"""Building blocks shared by columns, heads and decoders.

Written here rather than imported from timm/torchvision (neither imports beside the CPU
torch build this project pins). Linear and Conv2d initialise themselves in
``reset_parameters`` so that the published init (truncated normal, std .02, zero bias)
happens inside the module's own constructor: under ``deepspeed.zero.Init`` a parameter is
partitioned as soon as its module is built, so an init pass afterwards would be lost.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import randomness

INIT_STD = 0.02


@torch.no_grad()
def trunc_normal_init(module: nn.Module, generator=None) -> None:
    """The published init: weight ~ truncated normal (std .02, cut at +-2), bias 0, both times
    the module's ``init_scale`` (the classifier head's ``head_init_scale``). With ``generator``
    (a CPU one, ``models/init.py``) the draw happens on the CPU and is copied, so it is the same
    on every device."""
    w = module.weight
    if generator is None or (w.device.type == "cpu" and w.dtype == torch.float32):
        nn.init.trunc_normal_(w, std=INIT_STD, generator=generator)
    else:
        draw = torch.empty(w.shape, dtype=torch.float32)
        w.copy_(nn.init.trunc_normal_(draw, std=INIT_STD, generator=generator))
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    scale = getattr(module, "init_scale", None)
    if scale:
        w.mul_(scale)


class Linear(nn.Linear):
    def reset_parameters(self, generator=None) -> None:
        trunc_normal_init(self, generator)


class Conv2d(nn.Conv2d):
    def reset_parameters(self, generator=None) -> None:
        trunc_normal_init(self, generator)


def layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``ln`` on x (channels last). Weights of lower precision than x (DeepSpeed's bf16 mode
    casts them; the residual stream stays fp32) are raised to x's dtype, as CUDA autocast would
    do: on a CPU torch refuses fp32 inputs with bf16 parameters."""
    w, b = ln.weight, ln.bias
    if w is not None and w.dtype != x.dtype and torch.promote_types(w.dtype, x.dtype) == x.dtype:
        w, b = w.to(x.dtype), (b.to(x.dtype) if b is not None else None)
    return F.layer_norm(x, ln.normalized_shape, w, b, ln.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim (``layer_norm``'s dtype rule)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(self, x)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW tensor (the published "channels_first")."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(self, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Per-sample stochastic depth. Inside ``randomness.keyed`` a sample's mask is a function of
    (seed, step, the sample's global index, this module's name), so every layout draws the same
    masks; outside it draws from torch's generator (reversible replay restores its state)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p
        self.stream = randomness.stream_id("")  # the model names it (``name_random_streams``)

    def scaled_mask(self, batch: int, ndim: int, dtype: torch.dtype, device) -> torch.Tensor:
        """(batch, 1, ...) of 0 or 1/keep."""
        keep = 1.0 - self.p
        shape = (batch,) + (1,) * (ndim - 1)
        keys = randomness.current()
        if keys is None:
            return torch.empty(shape, dtype=dtype, device=device).bernoulli_(keep).div_(keep)
        if keys.ids.shape[0] != batch:
            raise ValueError(f"drop path got {batch} samples but the keyed batch has {keys.ids.shape[0]}: "
                             f"split the SampleKeys with the batch")
        return keys.scaled_mask(self.stream, keep, dtype).view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        return x * self.scaled_mask(x.shape[0], x.ndim, x.dtype, x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def name_random_streams(model: nn.Module) -> None:
    """Key each DropPath's draws by its name in the model (the same whole, per pipeline stage,
    or under ``zero.Init``)."""
    for name, m in model.named_modules():
        if isinstance(m, DropPath):
            m.stream = randomness.stream_id(name)


def random_streams(model: nn.Module) -> Tuple[int, ...]:
    """The streams a training forward of ``model`` draws from (its active DropPaths), so that
    ``SampleKeys`` can draw them all at once."""
    return tuple(sorted({m.stream for m in model.modules() if isinstance(m, DropPath) and m.p > 0}))


def stream_keeps(model: nn.Module, streams: Tuple[int, ...]) -> Tuple[float, ...]:
    """Each stream's keep probability (1 - drop path's rate), so that ``SampleKeys`` makes the
    masks of all of them at once too."""
    keep = {m.stream: 1.0 - m.p for m in model.modules() if isinstance(m, DropPath) and m.p > 0}
    return tuple(keep[s] for s in streams)


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
        self.norm = LayerNorm(channels, eps=1e-6)
        self.pwconv1 = Linear(channels, hidden)
        self.act = nn.GELU()
        self.pwconv2 = Linear(hidden, channels)
        self.layer_scale_init = layer_scale_init
        self.gamma = nn.Parameter(torch.full((channels,), layer_scale_init))
        self.drop_path = DropPath(drop_path)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The layer scale only (the sub-modules reset their own)."""
        self.gamma.fill_(self.layer_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        return x + self.drop_path(y)
