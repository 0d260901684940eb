"""Decoding and augmentation written here (torchvision does not import beside the CPU torch
this project pins): random-resized crop, flip, centre crop, normalisation, RandAugment
(rand-m9-mstd0.5-inc1) and random erasing on tensors after decode."""

from __future__ import annotations

import functools

import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


def rrc_box(h: int, w: int, rng: np.random.Generator, scale=RRC_SCALE, ratio=RRC_RATIO) -> Tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop (10 tries, then a centre crop)."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def train_crop(img: Image.Image, size: int, rng: np.random.Generator, flip: bool = True, scale=RRC_SCALE) -> np.ndarray:
    top, left, ch, cw = rrc_box(img.height, img.width, rng, scale=scale)
    out = img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    arr = np.array(out, dtype=np.uint8)
    if flip and rng.random() < 0.5:
        arr = np.ascontiguousarray(arr[:, ::-1])
    return arr


def center_crop(img: Image.Image, size: int, crop_ratio: float = 224 / 256) -> np.ndarray:
    """Resize the shorter side to size / crop_ratio, then take the centre size x size."""
    short = size / crop_ratio
    scale = short / min(img.width, img.height)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.array(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple, std: tuple, device: torch.device):
    """Made once per device (a tensor built from a list is a blocking copy on a GPU)."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def normalize(batch: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [B, 3, H, W] (0..255) -> float, normalised per channel."""
    m, s = _channel_stats(tuple(mean), tuple(std), batch.device)
    return (batch.float() - m) / s


# ---------------------------------------------------------------- RandAugment (uint8 CHW)

_FILL = (124, 116, 104)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: float) -> torch.Tensor:
    return (b.float() + factor * (a.float() - b.float())).clamp(0, 255).to(torch.uint8)


def _gray(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.float()
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(0)


def _affine(img: torch.Tensor, matrix) -> torch.Tensor:
    """Apply a 2x3 affine map (output -> input, in normalised coordinates), nearest, fill grey."""
    theta = torch.tensor(matrix, dtype=torch.float32).view(1, 2, 3)
    grid = F.affine_grid(theta, [1, 3, *img.shape[-2:]], align_corners=False)
    x = img.float().unsqueeze(0) + 1.0  # 0 marks "outside"
    out = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    fill = torch.tensor(_FILL, dtype=torch.float32).view(3, 1, 1) + 1.0
    out = torch.where(out == 0, fill, out)
    return (out - 1.0).clamp(0, 255).to(torch.uint8)


def _equalize(img: torch.Tensor) -> torch.Tensor:
    out = []
    for c in img:
        hist = torch.bincount(c.flatten().long(), minlength=256)
        nz = hist[hist > 0]
        step = (hist.sum() - nz[-1]) // 255 if len(nz) else 0
        if step == 0:
            out.append(c)
            continue
        lut = ((torch.cumsum(hist, 0) + step // 2) // step).clamp(0, 255)
        lut = torch.cat([torch.zeros(1, dtype=lut.dtype), lut[:-1]])
        out.append(lut[c.long()].to(torch.uint8))
    return torch.stack(out)


def _autocontrast(img: torch.Tensor) -> torch.Tensor:
    f = img.float()
    lo = f.amin(dim=(1, 2), keepdim=True)
    hi = f.amax(dim=(1, 2), keepdim=True)
    scale = torch.where(hi > lo, 255.0 / (hi - lo), torch.ones_like(hi))
    lo = torch.where(hi > lo, lo, torch.zeros_like(lo))
    return ((f - lo) * scale).clamp(0, 255).to(torch.uint8)


def _sharpness(img: torch.Tensor, factor: float) -> torch.Tensor:
    k = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=torch.float32) / 13
    blurred = F.conv2d(img.float().unsqueeze(1), k.view(1, 1, 3, 3), padding=1).squeeze(1)
    blurred[:, [0, -1], :] = img[:, [0, -1], :].float()
    blurred[:, :, [0, -1]] = img[:, :, [0, -1]].float()
    return _blend(img, blurred, factor)


def _signed(level: float, rng: np.random.Generator) -> float:
    return -level if rng.random() < 0.5 else level


def _apply_op(name: str, img: torch.Tensor, m: float, rng: np.random.Generator) -> torch.Tensor:
    """m in [0, 1]: the magnitude as a fraction of the maximum (10)."""
    if name == "AutoContrast":
        return _autocontrast(img)
    if name == "Equalize":
        return _equalize(img)
    if name == "Invert":
        return 255 - img
    if name == "Rotate":
        a = math.radians(_signed(30.0 * m, rng))
        return _affine(img, [math.cos(a), -math.sin(a), 0, math.sin(a), math.cos(a), 0])
    if name == "PosterizeIncreasing":
        bits = max(1, 4 - int(4 * m))
        mask = (0xFF << (8 - bits)) & 0xFF
        return img & mask
    if name == "SolarizeIncreasing":
        thresh = 256 - int(256 * m)
        return torch.where(img >= thresh, 255 - img, img)
    if name == "SolarizeAdd":
        add = int(110 * m)
        added = (img.int() + add).clamp(0, 255).to(torch.uint8)
        return torch.where(img < 128, added, img)
    if name == "ColorIncreasing":
        return _blend(img, _gray(img).expand_as(img), 1.0 + _signed(0.9 * m, rng))
    if name == "ContrastIncreasing":
        mean = _gray(img).mean()
        return _blend(img, torch.full_like(img, 0).float() + mean, 1.0 + _signed(0.9 * m, rng))
    if name == "BrightnessIncreasing":
        return _blend(img, torch.zeros_like(img), 1.0 + _signed(0.9 * m, rng))
    if name == "SharpnessIncreasing":
        return _sharpness(img, 1.0 + _signed(0.9 * m, rng))
    if name == "ShearX":
        s = _signed(0.3 * m, rng)
        return _affine(img, [1, s, 0, 0, 1, 0])
    if name == "ShearY":
        s = _signed(0.3 * m, rng)
        return _affine(img, [1, 0, 0, s, 1, 0])
    if name == "TranslateXRel":
        return _affine(img, [1, 0, _signed(0.45 * m, rng) * 2, 0, 1, 0])
    if name == "TranslateYRel":
        return _affine(img, [1, 0, 0, 0, 1, _signed(0.45 * m, rng) * 2])
    raise KeyError(name)


RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)


class RandAugment:
    """rand-m{magnitude}-mstd{std}-inc1: per image, `num_ops` ops drawn uniformly, each applied
    with probability `prob`, magnitude ~ N(magnitude, std) clipped to [0, 10]."""

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, std: float = 0.5, prob: float = 0.5) -> None:
        self.num_ops, self.magnitude, self.std, self.prob = num_ops, magnitude, std, prob

    def __call__(self, img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        for name in rng.choice(RAND_INCREASING_OPS, self.num_ops):
            if rng.random() > self.prob:
                continue
            m = float(np.clip(rng.normal(self.magnitude, self.std), 0, 10)) / 10.0
            img = _apply_op(str(name), img, m, rng)
        return img


def _per_image(rngs, n: int) -> list:
    """One generator per image (keyed by the sample: the same draws at any layout), or one for all."""
    return list(rngs) if isinstance(rngs, (list, tuple)) else [rngs] * n


def random_erasing(batch: torch.Tensor, prob: float, rngs) -> torch.Tensor:
    """Per image, with probability `prob`, replace a random rectangle (2%-33% of the area,
    aspect 0.3-3.3) by normal noise; on normalised float images, in place. ``rngs``: a generator
    per image, or one for the batch."""
    _, c, h, w = batch.shape
    for i, rng in enumerate(_per_image(rngs, batch.shape[0])):
        if rng.random() >= prob:
            continue
        for _ in range(10):
            area = h * w * rng.uniform(0.02, 1 / 3)
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if eh < h and ew < w:
                top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
                noise = torch.from_numpy(rng.standard_normal((c, eh, ew)).astype(np.float32))
                batch[i, :, top : top + eh, left : left + ew] = noise.to(batch.dtype)
                break
    return batch


def augment_batch(batch: torch.Tensor, rngs, randaug: Optional[RandAugment]) -> torch.Tensor:
    """RandAugment per image; ``rngs``: a generator per image, or one for the batch."""
    if randaug is None:
        return batch
    return torch.stack([randaug(img, rng) for img, rng in zip(batch, _per_image(rngs, batch.shape[0]))])
