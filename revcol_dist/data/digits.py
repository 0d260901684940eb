"""The embedded real data set: scikit-learn's handwritten digits (1,797 8x8 images).

They ship inside scikit-learn, so the main job needs no download. Images are upscaled to
RGB at the training resolution; the train/val split is stratified and fixed.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
VAL_FRACTION = 0.2
SPLIT_SEED = 0
# Per-channel statistics of the upscaled training images (grey: same for R, G, B).
MEAN = 0.3055
STD = 0.3237


def _split(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    train_idx, val_idx = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * VAL_FRACTION))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def digits_images(img_size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 images as float RGB in [0, 1], [N, 3, img_size, img_size], and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(d.target.astype(np.int64))


DIGITS_LAYOUT_VERSION = 1


def prepare_digits(root: str | "os.PathLike", img_size: int = 32, write_beton: bool = True) -> dict:
    """Convert the digits once to an ImageFolder (train/ and val/, RGB PNG at img_size) and,
    where FFCV is installed, to train.beton / val.beton. Returns the paths; later calls reuse them."""
    import json
    import os
    from pathlib import Path

    from PIL import Image

    from .ffcv_support import ffcv_available

    root = Path(root)
    marker = root / ".complete.json"
    want = {"version": DIGITS_LAYOUT_VERSION, "img_size": img_size}
    done = json.loads(marker.read_text()) if marker.is_file() else {}
    if {k: done.get(k) for k in want} != want:
        x, y = digits_images(img_size)
        tr, va = _split(y.numpy())
        for split, idx in (("train", tr), ("val", va)):
            for c in range(NUM_CLASSES):
                (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in idx:
                arr = (x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(arr).save(root / split / str(int(y[i])) / f"{int(i):04d}.png")
        done = dict(want)
        marker.write_text(json.dumps(done))
    paths = {"train": root / "train", "val": root / "val"}
    if write_beton and ffcv_available():
        from .write import write_beton as _write

        for split in ("train", "val"):
            beton = root / f"{split}.beton"
            if not beton.is_file() or not Path(str(beton) + ".json").is_file():
                _write(root / split, beton, max_res=None, workers=min(4, os.cpu_count() or 1), mode="raw", progress=False)
            paths[split] = beton
    return paths
