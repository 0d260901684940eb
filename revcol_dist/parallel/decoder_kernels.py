"""The intermediate-supervision decoder's stages as functions of tensors, for ``torch.compile``.

A ``Decoder`` stage (1x1 conv, LayerNorm, GELU, bilinear resize, a 3x3 ConvNeXt block) ran as
about sixty eager kernels per stage in a RevCol-B step, counting its recomputation
(``checkpoint_heads``) and backward; its output stage (1x1 conv to 48 channels, pixel shuffle)
as a few more with their casts. As functions of tensors, one compiled graph per shape serves
every decoder (RevCol-B has three), guards never depend on a module, and the stage's backward
is the graph's own. A checkpointed stage calls the same graph again when it recomputes, so it
recomputes the forward's values exactly.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..reversible import block_kernels, resize


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim; lower-precision weights raised to x's dtype (``models.layers``)."""
    if w.dtype != x.dtype and torch.promote_types(w.dtype, x.dtype) == x.dtype:
        w, b = w.to(x.dtype), b.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def stage_forward(x: torch.Tensor, size: Tuple[int, int], proj: tuple, block: tuple, block_conv: block_kernels.Conv,
                  eps: Tuple[float, float], index: tuple) -> torch.Tensor:
    """``Decoder.stage``: ``proj`` = (conv weight, conv bias, LN weight, LN bias), ``block`` the
    ConvNeXt block's tensors in ``block_kernels.forward_full``'s order, ``index`` the bilinear
    resize's source indices to ``size`` (``stage_index``)."""
    cw, cb, lw, lb = proj
    y = F.conv2d(x, cw, cb)
    y = F.gelu(_layer_norm(y.permute(0, 2, 3, 1), lw, lb, eps[0]).permute(0, 3, 1, 2))
    y = resize.bilinear(y, index)
    return block_kernels.forward_full(y, *block, None, block_conv, eps[1])[0]


def output_forward(x: torch.Tensor, image_size: Tuple[int, int], w: torch.Tensor, b: torch.Tensor,
                   upscale: int) -> torch.Tensor:
    """``Decoder.output``: 1x1 conv, pixel shuffle, resized to the image where sizes differ."""
    img = F.pixel_shuffle(F.conv2d(x, w, b), upscale)
    if tuple(img.shape[-2:]) == tuple(image_size):
        return img
    return F.interpolate(img, size=tuple(image_size), mode="bilinear", align_corners=False)


def stage_arguments(decoder: nn.Module, i: int) -> tuple:
    """(proj, block, block_conv, eps) of ``stage_forward`` for stage i of a ``Decoder``."""
    conv, norm, _ = decoder.proj_layers[i]
    block = decoder.normal_layers[i][0]
    dw = block.dwconv
    tensors = (dw.weight, dw.bias, block.norm.weight, block.norm.bias, block.pwconv1.weight, block.pwconv1.bias,
               block.pwconv2.weight, block.pwconv2.bias, block.gamma)
    return ((conv.weight, conv.bias, norm.weight, norm.bias), tensors,
            (tuple(dw.stride), tuple(dw.padding), tuple(dw.dilation), dw.groups), (norm.eps, block.norm.eps))


def stage_index(x: torch.Tensor, size: Sequence[int]) -> tuple:
    """The bilinear resize's source indices from x's size to ``size`` (``resize.bilinear_indices``)."""
    return resize.bilinear_indices(tuple(x.shape[-2:]), sizes(size), x.device)


def output_arguments(decoder: nn.Module) -> tuple:
    conv, shuffle = decoder.projback
    return conv.weight, conv.bias, shuffle.upscale_factor


def cast_targets(decoder: nn.Module) -> Tuple[torch.Tensor, ...]:
    """What autocast casts in a decoder: its convolutions' and its blocks' conv and matmul
    weights and biases (not the LayerNorms', not the layer scales)."""
    from ..reversible.lean_block import cast_targets as block_targets

    out = []
    for proj, (block,) in zip(decoder.proj_layers, decoder.normal_layers):
        out += [proj[0].weight, proj[0].bias, *block_targets(block)]
    conv = decoder.projback[0]
    return tuple(t for t in (*out, conv.weight, conv.bias) if t is not None)


def fits(decoder: nn.Module) -> bool:
    """The module is the decoder these functions compute: 1x1 projections without stride or
    padding, GELU, blocks without drop path, a pixel shuffle output."""
    from ..models.heads import Decoder

    if not isinstance(decoder, Decoder):
        return False
    for proj, (block,) in zip(decoder.proj_layers, decoder.normal_layers):
        conv, act = proj[0], proj[2]
        if (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding), conv.groups) != ((1, 1), (1, 1), (0, 0), 1):
            return False
        if not isinstance(act, nn.GELU) or act.approximate != "none" or block.drop_path.p > 0:
            return False
    conv = decoder.projback[0]
    return (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding)) == ((1, 1), (1, 1), (0, 0))


def sizes(size: Sequence[int]) -> Tuple[int, int]:
    return int(size[0]), int(size[1])
