"""Nearest and bilinear resizing for the compiled graphs, with their source indices computed
once per shape outside the graph.

Inductor decomposes ``F.interpolate`` into gathers at indices it computes from ``arange`` inside
the graph. In a training graph the partitioner saves those few-element index tensors for the
backward, so every call launches a kernel per index tensor before the resize itself: six per
bilinear resize (a decoder stage, three times a step), one per nearest one (a fusion's up
part). Computed here once per (sizes, device) and passed in, the graphs only gather: the same
ops on the same index values as the decomposition (``torch._decomp``'s ``_upsample_nearest``
and ``_upsample_linear``), so the same results for fp32 input (the decomposition makes its
indices and weights in the input's dtype; these are fp32 always, as eager's CUDA kernel makes
them).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

Size = Tuple[int, int]


_CACHE: Dict[tuple, tuple] = {}
_CACHE_SIZE = 256  # shapes x devices; a run has a handful


def _cached(make: Callable) -> Callable:
    """``make(in_hw, out_hw, device)`` once per arguments: built as ordinary tensors (not under
    inference mode, which could never be saved for a backward), not kept when made while a CUDA
    graph is captured (its memory the graph's); ``make`` itself as ``.make``."""
    def get(in_hw: Size, out_hw: Size, device: torch.device):
        key = (make.__name__, tuple(in_hw), tuple(out_hw), torch.device(device))
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        with torch.inference_mode(False), torch.no_grad():
            made = make(tuple(in_hw), tuple(out_hw), torch.device(device))
        capturing = torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing and len(_CACHE) < _CACHE_SIZE:
            _CACHE[key] = made
        return made
    get.make = make
    return get


@_cached
def nearest_indices(in_hw: Size, out_hw: Size, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Source rows (out_h, 1) and columns (out_w,) of ``mode="nearest"`` at ``out_hw``: floor(i * in / out)."""
    rows, cols = (((torch.arange(o, dtype=torch.float32, device=device)) * (i / o)).to(torch.int64)
                  for i, o in zip(in_hw, out_hw))
    return rows.unsqueeze(-1), cols


@_cached
def bilinear_indices(in_hw: Size, out_hw: Size, device: torch.device) -> Tuple[tuple, tuple]:
    """Per axis (rows shaped (out_h, 1), columns (out_w,)): the lower and upper source index and
    the fp32 weight of the upper one, for ``mode="bilinear", align_corners=True``."""
    axes = []
    for i, o, shape in ((in_hw[0], out_hw[0], (-1, 1)), (in_hw[1], out_hw[1], (-1,))):
        scale = (i - 1.0) / (o - 1.0) if o > 1 else 0.0
        src = (scale * torch.arange(o, device=device).to(torch.float32)).clamp(min=0.0)
        lo = src.to(torch.int64)
        hi = (lo + 1).clamp(max=i - 1)
        weight = (src - lo).clamp(0.0, 1.0)
        axes.append((lo.reshape(shape), hi.reshape(shape), weight.reshape(shape)))
    return tuple(axes)


def _memory_format(x: torch.Tensor, narrow: int) -> torch.memory_format:
    """The layout the decomposition gives its result: the input's, except contiguous on CUDA
    below ``narrow`` channels."""
    from torch._prims_common import suggest_memory_format

    if x.device.type == "cuda" and x.shape[1] < narrow:
        return torch.contiguous_format
    return suggest_memory_format(x)


def nearest(x: torch.Tensor, index: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="nearest")`` at ``index = nearest_indices(...)``."""
    out = torch.ops.aten._unsafe_index(x, [None, None, *index])
    return out.contiguous(memory_format=_memory_format(x, 4))


def bilinear(x: torch.Tensor, index: Tuple[tuple, tuple]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=True)`` at ``index =
    bilinear_indices(...)``: x1 + (x2 - x1) * w along the columns, then the rows."""
    (r0, r1, rw), (c0, c1, cw) = index
    at = lambda r, c: torch.ops.aten._unsafe_index(x, [None, None, r, c])  # noqa: E731
    top, bottom = at(r0, c0), at(r1, c0)
    top = top + torch.mul(at(r0, c1) - top, cw.to(x.dtype))
    bottom = bottom + torch.mul(at(r1, c1) - bottom, cw.to(x.dtype))
    out = top + torch.mul(bottom - top, rw.to(x.dtype))
    return out.contiguous(memory_format=_memory_format(x, 16))
