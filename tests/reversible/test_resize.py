"""The compiled graphs' resizing with precomputed source indices (``reversible/resize.py``)
against ``F.interpolate``: nearest bitwise, bilinear within fp32 rounding, in the layout the
decomposition gives."""

import pytest
import torch
import torch.nn.functional as F

from revcol_dist.reversible import resize

SIZES = [((7, 7), (14, 14)), ((28, 28), (56, 56)), ((14, 14), (56, 56)), ((5, 6), (11, 13)), ((1, 1), (4, 4))]


@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_resize_matches_interpolate(src, dst, layout):
    x = torch.randn(2, 24, *src, generator=torch.Generator().manual_seed(0)).to(memory_format=layout)
    near = resize.nearest(x, resize.nearest_indices(src, dst, x.device))
    ref = F.interpolate(x, size=dst, mode="nearest")
    assert torch.equal(near, ref) and near.stride() == ref.stride()
    lin = resize.bilinear(x, resize.bilinear_indices(src, dst, x.device))
    ref = F.interpolate(x, size=dst, mode="bilinear", align_corners=True)
    assert (lin - ref).abs().max() <= 1e-6 * ref.abs().max() and lin.stride() == ref.stride()


def test_indices_are_made_once_per_shape_and_device():
    a = resize.bilinear_indices((7, 7), (14, 14), torch.device("cpu"))
    assert resize.bilinear_indices((7, 7), (14, 14), torch.device("cpu")) is a
    rows, cols = resize.nearest_indices((3, 5), (6, 10), torch.device("cpu"))
    assert rows.shape == (6, 1) and cols.shape == (10,)
    assert rows.flatten().tolist() == [0, 0, 1, 1, 2, 2] and cols.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
