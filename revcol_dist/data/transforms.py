"""Decoding and augmentation written here (torchvision does not import beside the CPU torch
this project pins): random-resized crop, flip, centre crop, normalisation, RandAugment
(rand-m9-mstd0.5-inc1) and random erasing on tensors after decode. The fallback's workers run
these; ``augment_numba`` computes the same bytes for FFCV's worker threads; ``erase_batch`` is
the device form. Draws come from ``draws`` (keyed by seed, epoch and sample index)."""

from __future__ import annotations

import functools

import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from PIL import Image

from . import draws

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
    """uint8 [B, 3, H, W] (0..255) -> float, normalised per channel, contiguous (FFCV's
    device copies arrive channels_last; the trainer applies its own memory format)."""
    m, s = _channel_stats(tuple(mean), tuple(std), batch.device)
    return (batch.to(torch.float32, memory_format=torch.contiguous_format) - m) / s


# ---------------------------------------------------------------- RandAugment (uint8 CHW)

_FILL = (124, 116, 104)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: float) -> torch.Tensor:
    return (b.float() + factor * (a.float() - b.float())).clamp(0, 255).to(torch.uint8)


def _gray(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.float()
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(0)


def _affine(img: torch.Tensor, matrix) -> torch.Tensor:
    """Apply a 2x3 map (output -> input, normalised coordinates about the centre, pixel
    centres at (2j + 1) / W - 1), nearest with ties to even, fill grey; float64 coordinates,
    in the same order of operations as the compiled kernel (``augment_numba._affine``)."""
    t0, t1, t2, t3, t4, t5 = (float(v) for v in matrix)
    _, h, w = img.shape
    xn = ((2.0 * torch.arange(w, dtype=torch.float64) + 1.0) / w - 1.0).view(1, w)
    yn = ((2.0 * torch.arange(h, dtype=torch.float64) + 1.0) / h - 1.0).view(h, 1)
    x0 = torch.round(((t0 * xn + (t1 * yn + t2) + 1.0) * w - 1.0) * 0.5)
    y0 = torch.round(((t3 * xn + (t4 * yn + t5) + 1.0) * h - 1.0) * 0.5)
    inside = (x0 >= 0) & (x0 < w) & (y0 >= 0) & (y0 < h)
    flat = torch.where(inside, y0 * w + x0, 0).long().view(-1)
    out = img.reshape(3, -1)[:, flat].view(3, h, w)
    fill = torch.tensor(_FILL, dtype=torch.uint8).view(3, 1, 1)
    return torch.where(inside, out, fill)


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
    """Per channel, the exact floor of (v - lo) * 255 / (hi - lo) (a flat channel stays)."""
    v = img.int()
    lo = v.amin(dim=(1, 2), keepdim=True)
    hi = v.amax(dim=(1, 2), keepdim=True)
    stretched = (v - lo) * 255 // (hi - lo).clamp(min=1)
    return torch.where(hi > lo, stretched.clamp(0, 255), v).to(torch.uint8)


def _sharpness(img: torch.Tensor, factor: float) -> torch.Tensor:
    k = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=torch.float32)
    # an integer sum (exact in float32 in any order), then / 13: the compiled kernel's value
    blurred = F.conv2d(img.float().unsqueeze(1), k.view(1, 1, 3, 3), padding=1).squeeze(1) / 13
    blurred[:, [0, -1], :] = img[:, [0, -1], :].float()
    blurred[:, :, [0, -1]] = img[:, :, [0, -1]].float()
    return _blend(img, blurred, factor)


def _apply_op(name: str, img: torch.Tensor, m: float, neg: bool) -> torch.Tensor:
    """m in [0, 1]: the magnitude as a fraction of the maximum (10); neg: the signed ops'
    level negated."""

    def _signed(level: float) -> float:
        return -level if neg else level

    if name == "AutoContrast":
        return _autocontrast(img)
    if name == "Equalize":
        return _equalize(img)
    if name == "Invert":
        return 255 - img
    if name == "Rotate":
        a = _signed(30.0 * m) * (math.pi / 180.0)
        return _affine(img, [math.cos(a), -math.sin(a), 0, math.sin(a), math.cos(a), 0])
    if name == "PosterizeIncreasing":
        bits = max(1, 4 - int(4 * m))
        mask = (0xFF << (8 - bits)) & 0xFF
        return img & mask
    if name == "SolarizeIncreasing":
        thresh = 256 - int(256 * m)
        return torch.where(img.int() >= thresh, 255 - img, img)  # thresh may be 256: nothing
    if name == "SolarizeAdd":
        add = int(110 * m)
        added = (img.int() + add).clamp(0, 255).to(torch.uint8)
        return torch.where(img < 128, added, img)
    if name == "ColorIncreasing":
        return _blend(img, _gray(img).expand_as(img), 1.0 + _signed(0.9 * m))
    if name == "ContrastIncreasing":
        mean = _gray(img).double().mean().float()  # float64 sum: the compiled kernel's too
        return _blend(img, torch.full_like(img, 0).float() + mean, 1.0 + _signed(0.9 * m))
    if name == "BrightnessIncreasing":
        return _blend(img, torch.zeros_like(img), 1.0 + _signed(0.9 * m))
    if name == "SharpnessIncreasing":
        return _sharpness(img, 1.0 + _signed(0.9 * m))
    if name == "ShearX":
        s = _signed(0.3 * m)
        return _affine(img, [1, s, 0, 0, 1, 0])
    if name == "ShearY":
        s = _signed(0.3 * m)
        return _affine(img, [1, 0, 0, s, 1, 0])
    if name == "TranslateXRel":
        return _affine(img, [1, 0, _signed(0.45 * m) * 2.0, 0, 1, 0])
    if name == "TranslateYRel":
        return _affine(img, [1, 0, 0, 0, 1, _signed(0.45 * m) * 2.0])
    raise KeyError(name)


RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)


class RandAugment:
    """rand-m{magnitude}-mstd{std}-inc1: per image, `num_ops` ops drawn uniformly, each applied
    with probability `prob`, magnitude ~ N(magnitude, std) clipped to [0, 10]. The draws are
    the sample's (``draws.randaug_slot``), the same the compiled FFCV operation makes."""

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, std: float = 0.5, prob: float = 0.5) -> None:
        self.num_ops, self.magnitude, self.std, self.prob = num_ops, magnitude, std, prob

    def __call__(self, img: torch.Tensor, key) -> torch.Tensor:
        """img: CHW uint8; key: ``draws.sample_key(seed, epoch, index, draws.RANDAUG)``."""
        for j in range(self.num_ops):
            op, applied, m, neg = draws.randaug_slot(key, j, len(RAND_INCREASING_OPS), self.magnitude, self.std, self.prob)
            if applied:
                img = _apply_op(RAND_INCREASING_OPS[op], img, m, neg)
        return img


def erase_image(x: torch.Tensor, key, prob: float, bank: torch.Tensor) -> torch.Tensor:
    """One normalised CHW image, in place: with probability `prob` a box (2%-33% of the area,
    aspect 0.3-3.3, the first of 10 tries that fits) filled with normal noise, a window of
    ``bank`` (``draws.noise_bank``). key: ``draws.sample_key(..., draws.ERASE)``."""
    c, h, w = x.shape
    erased, top, left, eh, ew, off = draws.erase_box(key, h, w, bank.numel(), prob)
    if erased:
        x[:, top : top + eh, left : left + ew] = bank[off : off + c * eh * ew].view(c, eh, ew).to(x.dtype)
    return x


def erase_batch(x: torch.Tensor, index: torch.Tensor, seed: int, epoch: int, prob: float, bank: torch.Tensor) -> torch.Tensor:
    """erase_image for a whole batch on its device, vectorised: boxes drawn from the int64
    indices on the device, no host round trip, no per-image launch."""
    if prob <= 0:
        return x
    n, c, h, w = x.shape
    dev = x.device
    keys = draws.sample_keys_t(seed, epoch, index.to(dev, torch.int64), draws.ERASE)
    u = draws.unit_t(keys[:, None], torch.arange(draws.ERASE_OFFSET + 1, device=dev)[None, :])
    a0, a1 = draws.ERASE_AREA
    l0, l1 = draws.ERASE_LOG_ASPECT
    tries = u[:, 1 : draws.ERASE_OFFSET].view(n, draws.ERASE_TRIES, 4)
    area = h * w * (a0 + (a1 - a0) * tries[..., 0])
    aspect = torch.exp(l0 + (l1 - l0) * tries[..., 1])
    eh, ew = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (eh < h) & (ew < w)
    first = fits.int().argmax(1, keepdim=True)
    pick = lambda t: t.gather(1, first).view(n)  # noqa: E731
    eh, ew = pick(eh), pick(ew)
    top = (pick(tries[..., 2]) * (h - eh + 1)).floor()
    left = (pick(tries[..., 3]) * (w - ew + 1)).floor()
    off = (u[:, draws.ERASE_OFFSET] * (bank.numel() - c * eh * ew + 1)).floor()
    erased = (u[:, 0] < prob) & fits.any(1)
    col = lambda t: t.int().view(n, 1, 1, 1)  # noqa: E731 (int32: the [B, 3, H, W] index maps are the big temporaries)
    eh, ew, top, left, off = col(eh), col(ew), col(top), col(left), col(off)
    y = torch.arange(h, device=dev, dtype=torch.int32).view(1, 1, h, 1) - top
    xx = torch.arange(w, device=dev, dtype=torch.int32).view(1, 1, 1, w) - left
    ch = torch.arange(c, device=dev, dtype=torch.int32).view(1, c, 1, 1)
    inside = (y >= 0) & (y < eh) & (xx >= 0) & (xx < ew) & erased.view(n, 1, 1, 1)
    pos = torch.where(inside, off + (ch * eh + y) * ew + xx, 0)
    return torch.where(inside, bank.to(dev)[pos].to(x.dtype), x)


