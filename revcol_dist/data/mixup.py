"""Mixup / CutMix on a batch, with label-smoothed soft targets (the published "batch" mode).

One mixing coefficient per batch; the partner of sample i is sample n-1-i (the batch flipped).
Draws come from a generator seeded by (seed, step, rank), so a resumed run mixes identically.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    t = torch.full((labels.numel(), num_classes), off, device=labels.device)
    return t.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(h: int, w: int, lam: float, rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a box with area about (1 - lam) of the image, centre uniform, clipped."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    return (max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w))


class Mixup:
    def __init__(self, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.1, seed: int = 0) -> None:
        self.num_classes, self.mixup, self.cutmix = num_classes, mixup, cutmix
        self.prob, self.switch_prob, self.smoothing, self.seed = prob, switch_prob, smoothing, seed

    @property
    def enabled(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0

    def params(self, step: int, rank: int, h: int, w: int):
        """(lam, box or None) for this step; lam=1 means the batch passes unmixed."""
        rng = np.random.default_rng([self.seed, step, rank, 0x6D6978])
        if rng.random() >= self.prob:
            return 1.0, None
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < self.switch_prob)
        if not use_cutmix:
            return float(rng.beta(self.mixup, self.mixup)), None
        lam = float(rng.beta(self.cutmix, self.cutmix))
        box = cutmix_box(h, w, lam, rng)
        y0, y1, x0, x1 = box
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the area actually pasted
        return lam, box

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int, rank: int = 0):
        if images.shape[0] % 2:
            raise ValueError(f"mixup/cutmix need an even per-rank batch, got {images.shape[0]}")
        lam, box = self.params(step, rank, images.shape[-2], images.shape[-1])
        flipped = images.flip(0)
        if box is not None:
            y0, y1, x0, x1 = box
            images = images.clone()
            images[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        elif lam < 1.0:
            images = images * lam + flipped * (1.0 - lam)
        t = smooth_one_hot(labels, self.num_classes, self.smoothing)
        return images, t * lam + t.flip(0) * (1.0 - lam)
