"""The baseline a user would otherwise run: a torch DataLoader whose workers do what timm's
ImageNet training transform does, in PIL (timm itself needs torchvision, which does not import
beside the CPU torch pinned here, so the same steps are written out): random-resized crop
(bicubic), flip, RandAugment rand-m9-mstd0.5-inc1 with PIL's ImageOps / ImageEnhance /
Image.transform, to-tensor, normalise, random erasing with per-pixel normal noise; all in the
worker processes, batches collated and handed to the training process."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import DataLoader, Dataset

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
FILL = (124, 116, 104)


def _signed(v: float, r) -> float:
    return -v if r.random() < 0.5 else v


def _affine(img: Image.Image, coeffs) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=FILL)


def _op(name: str, img: Image.Image, m: float, r) -> Image.Image:
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(_signed(30 * m, r), resample=Image.BILINEAR, fillcolor=FILL)
    if name == "Posterize":
        return ImageOps.posterize(img, max(1, 4 - int(4 * m)))
    if name == "Solarize":
        return ImageOps.solarize(img, 256 - int(256 * m))
    if name == "SolarizeAdd":
        add = int(110 * m)
        return img.point([min(255, v + add) if v < 128 else v for v in range(256)] * 3)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, name)(img).enhance(1.0 + _signed(0.9 * m, r))
    if name == "ShearX":
        return _affine(img, (1, _signed(0.3 * m, r), 0, 0, 1, 0))
    if name == "ShearY":
        return _affine(img, (1, 0, 0, _signed(0.3 * m, r), 1, 0))
    if name == "TranslateX":
        return _affine(img, (1, 0, _signed(0.45 * m, r) * img.size[0], 0, 1, 0))
    return _affine(img, (1, 0, 0, 0, 1, _signed(0.45 * m, r) * img.size[1]))  # TranslateY


OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")


def _crop(img: Image.Image, size: int, r) -> Image.Image:
    w, h = img.size
    for _ in range(10):
        area = w * h * r.uniform(0.08, 1.0)
        aspect = math.exp(r.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = r.randint(0, w - cw), r.randint(0, h - ch)
            return img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    return img.resize((size, size), Image.BICUBIC)


class PILRecipe(Dataset):
    def __init__(self, samples: List[Tuple[str, int]], size: int, erasing: float = 0.25, randaug: bool = True) -> None:
        self.samples, self.size, self.erasing, self.randaug = samples, size, erasing, randaug

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        r = random  # the DataLoader seeds each worker's generator, as timm relies on
        path, label = self.samples[i]
        with Image.open(path) as im:
            img = _crop(im.convert("RGB"), self.size, r)
        if r.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.randaug:
            for _ in range(2):
                name = r.choice(OPS)
                if r.random() > 0.5:
                    continue
                m = min(max(r.gauss(9.0, 0.5), 0.0), 10.0) / 10.0
                img = _op(name, img, m, r)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        x = (x - MEAN) / STD
        if r.random() < self.erasing:
            _, h, w = x.shape
            for _ in range(10):
                area = h * w * r.uniform(0.02, 1 / 3)
                aspect = math.exp(r.uniform(math.log(0.3), math.log(1 / 0.3)))
                eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if eh < h and ew < w:
                    top, left = r.randint(0, h - eh), r.randint(0, w - ew)
                    x[:, top : top + eh, left : left + ew] = torch.empty(3, eh, ew).normal_()
                    break
        return x, label


def pil_loader(root: Path, size: int, batch: int, workers: int, **kw) -> DataLoader:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    samples = [(str(f), c) for c, name in enumerate(classes) for f in sorted((root / name).iterdir())]
    return DataLoader(PILRecipe(samples, size, **kw), batch_size=batch, shuffle=True, num_workers=workers,
                      drop_last=True, persistent_workers=True)
