"""A level's fusion (down: 2x2/2 conv + LayerNorm; up: Linear + LayerNorm + nearest resize; the
sum) as a function of tensors, for ``torch.compile``.

Like ``block_kernels``: one compiled graph per level and shape serves every column, and guards
never depend on a module. The reversible engine calls it with autograd on, in the forward (its
output detached) and in the recomputation alike, so both run the same compiled training graph:
the recomputed fusion output, and so the level, is bitwise the forward's. Its backward is the
graph's own (AOTAutograd), reached by the engine's ordinary ``autograd.grad``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from torch import nn

from . import resize


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim; lower-precision weights raised to x's dtype (``models.layers``)."""
    if w.dtype != x.dtype and torch.promote_types(w.dtype, x.dtype) == x.dtype:
        w, b = w.to(x.dtype), b.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _up(x: torch.Tensor, w, b, ln_w, ln_b, eps: float, index) -> torch.Tensor:
    u = _layer_norm(F.linear(x.permute(0, 2, 3, 1), w, b), ln_w, ln_b, eps).permute(0, 3, 1, 2)
    return resize.nearest(u, index)


def fusion_forward(down_in, up_in, up2_in, down: Optional[tuple], up: Optional[tuple], up2: Optional[tuple],
                   eps: Tuple[float, float, float], index: Tuple[Optional[tuple], Optional[tuple]] = (None, None)
                   ) -> torch.Tensor:
    """``Fusion.forward``: ``down``, ``up``, ``up2`` are the parts' tensors (``fusion_tensors``);
    ``index``: the up parts' nearest-resize indices (``_resize_indices``)."""
    if down is None:
        y = down_in
    else:
        cw, cb, lw, lb = down
        y = F.conv2d(down_in, cw, cb, stride=2)
        y = _layer_norm(y.permute(0, 2, 3, 1), lw, lb, eps[0]).permute(0, 3, 1, 2)
    if up is not None:
        y = _up(up_in, *up, eps[1], index[0]) + y
    if up2 is not None:
        y = y + _up(up2_in, *up2, eps[2], index[1])
    return y


def _resize_indices(fusion: nn.Module, down_in: torch.Tensor, up_in: Optional[torch.Tensor],
                    up2_in: Optional[torch.Tensor]) -> Tuple[Optional[tuple], Optional[tuple]]:
    """The up parts' nearest-resize source indices (``resize.nearest_indices``) to the fusion's
    output size: ``down_in``'s, halved by the 2x2/2 down conv where the fusion has one."""
    h, w = down_in.shape[-2:]
    size = (h, w) if _part(fusion.down) is None else (h // 2, w // 2)
    return tuple(None if t is None else resize.nearest_indices(tuple(t.shape[-2:]), size, t.device)
                 for t in (up_in, up2_in))


def _part(module: Optional[nn.Module]) -> Optional[tuple]:
    if module is None or isinstance(module, nn.Identity):
        return None
    if hasattr(module, "channel_reschedule"):  # UpSample
        linear, norm = module.channel_reschedule
        return linear.weight, linear.bias, norm.weight, norm.bias
    conv, norm = module  # down: Conv2d(k=2, s=2), LayerNorm2d
    return conv.weight, conv.bias, norm.weight, norm.bias


def _eps(module: Optional[nn.Module]) -> float:
    if module is None or isinstance(module, nn.Identity):
        return 0.0
    return (module.channel_reschedule[1] if hasattr(module, "channel_reschedule") else module[1]).eps


def fusion_arguments(fusion: nn.Module, down_in: torch.Tensor, up_in: Optional[torch.Tensor],
                     up2_in: Optional[torch.Tensor]) -> tuple:
    """(down, up, up2, eps, index) of ``fusion_forward`` for a ``Fusion`` module on these inputs."""
    return (_part(fusion.down), _part(fusion.up), _part(fusion.up2),
            (_eps(fusion.down), _eps(fusion.up), _eps(fusion.up2)), _resize_indices(fusion, down_in, up_in, up2_in))


def cast_targets(fusion: nn.Module) -> Tuple[torch.Tensor, ...]:
    """What autocast casts in a fusion: the down conv's and the up Linears' weights and biases
    (not the LayerNorms'); empty where the function does not compute the module."""
    if not fits(fusion):
        return ()
    return tuple(t for part in (_part(fusion.down), _part(fusion.up), _part(fusion.up2)) if part is not None
                 for t in part[:2] if t is not None)


def fits(fusion: nn.Module) -> bool:
    """The module is the fusion this function computes (2x2/2 down conv without padding)."""
    down = fusion.down
    if isinstance(down, nn.Identity):
        return True
    conv = down[0]
    return tuple(conv.kernel_size) == (2, 2) and tuple(conv.stride) == (2, 2) and tuple(conv.padding) == (0, 0)
