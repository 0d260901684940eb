"""Analytic compute of a RevCol: multiply-accumulates per forward, the published "FLOPs".
The planner sizes runs with it and the trainer reports model FLOPs utilisation from it."""

from __future__ import annotations

import math
from typing import List


def forward_macs(cfg, res: int) -> int:
    """Multiply-accumulates of one deploy-mode forward (the published "FLOPs"): stem, per column
    and level the ConvNeXt blocks (k² c depthwise + 8 c² pointwise per position), the strided
    down-fusion (4 c_{l-1} c_l per position), the up-fusion's channel change at the lower
    resolution (columns after the first), RevCol-H's level-0 branch from level 3, the head."""
    c = cfg.channels
    macs = (res // 4) ** 2 * 3 * c[0] * 16
    for j in range(cfg.num_columns):
        macs += sum(level_macs(cfg, res, first_column=j == 0))
    return macs + c[3] * cfg.num_classes


def level_macs(cfg, res: int, first_column: bool = False) -> List[int]:
    """Forward multiply-accumulates of each level of one column."""
    k2 = cfg.kernel_size**2
    side = [math.ceil(res / (4 * 2**l)) for l in range(4)]
    c = cfg.channels
    out = []
    for l in range(4):
        pos = side[l] ** 2
        macs = cfg.layers[l] * pos * (k2 * c[l] + 8 * c[l] ** 2)
        if l >= 1:
            macs += pos * 4 * c[l - 1] * c[l]
        if not first_column and l <= 2:
            macs += side[l + 1] ** 2 * c[l + 1] * c[l]
        if not first_column and l == 0 and cfg.level0_up2:
            macs += side[3] ** 2 * c[3] * c[0]
        out.append(macs)
    return out


def train_flops_per_image(cfg, res: int) -> int:
    """Model FLOPs of one training image (forward + backward = 3 forwards, 2 FLOPs a MAC),
    as MFU counts them: the reversible recomputation is not counted (that would be HFU)."""
    return 6 * forward_macs(cfg, res)
