"""Mixup / CutMix on a batch, with label-smoothed soft targets (the published "batch" mode).

One mixing coefficient per global batch, drawn from a generator seeded by (seed, step) only;
the partner of sample 2k is 2k+1 and back (adjacent pairs of the global batch's order, which is
random). A rank's share and each micro-batch of it start at an even position, so every pair is
whole wherever it lands: one process, 2 ranks or grad_accum mix the same pixels. (The published
code pairs i with n-1-i of the rank's batch, which changes with the number of ranks.)
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

    def params(self, step: int, h: int, w: int):
        """(lam, box or None) for this step, the same on every rank; lam=1: the batch passes unmixed."""
        rng = np.random.default_rng([self.seed, step, 0x6D6978])
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

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int):
        if images.shape[0] % 2:
            raise ValueError(f"mixup/cutmix need an even per-rank batch, got {images.shape[0]}")
        lam, box = self.params(step, images.shape[-2], images.shape[-1])
        flipped = _swap_pairs(images)
        if box is not None:
            y0, y1, x0, x1 = box
            images = images.clone()
            images[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        elif lam < 1.0:
            images = images * lam + flipped * (1.0 - lam)
        t = smooth_one_hot(labels, self.num_classes, self.smoothing)
        return images, t * lam + _swap_pairs(t) * (1.0 - lam)


def _swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """Samples (0, 1, 2, 3, ...) as (1, 0, 3, 2, ...)."""
    return x.reshape(x.shape[0] // 2, 2, *x.shape[1:]).flip(1).reshape(x.shape)
