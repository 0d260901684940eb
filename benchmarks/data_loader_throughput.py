"""Images/s of the FFCV train pipeline vs a torch DataLoader (PIL decode + the same
random-resized crop), same worker count, over a generated folder of real-photo JPEGs.

python benchmarks/data_loader_throughput.py [--images 2000] [--workers 2] [--size 160]
(one JSON line on stdout; needs the ffcv extra and scikit-image)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field",
          "retina", "colorwheel", "camera", "coins", "moon", "horse", "clock", "grass", "gravel", "brick")


def make_folder(root: Path, n: int, seed: int = 0) -> None:
    """n JPEGs, 160-320 px on the long side, cut from scikit-image's bundled photos, 10 classes."""
    import skimage.data

    photos = []
    for name in PHOTOS:
        arr = np.asarray(getattr(skimage.data, name)())
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        if arr.dtype != np.uint8:
            arr = (255 * (arr.astype(np.float64) / max(1, arr.max()))).astype(np.uint8)
        photos.append(Image.fromarray(arr[..., :3]))
    rng = np.random.default_rng(seed)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = int(rng.integers(w // 3, w + 1)), int(rng.integers(h // 3, h + 1))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        long_side = int(rng.integers(160, 321))
        s = long_side / max(cw, ch)
        crop = img.resize((max(1, round(cw * s)), max(1, round(ch * s))), Image.BICUBIC, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(root / f"class{i % 10}" / f"{i:05d}.jpg", quality=90)


def throughput(stream, epochs: int) -> float:
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y, _ in stream:
            n += len(y)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    from revcol_dist.data.loader import build_loader
    from revcol_dist.data.write import write_beton

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        make_folder(tmp / "imgs", args.images)
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        write_beton(tmp / "imgs", tmp / "train.beton", max_res=320, jpeg_quality=90, workers=args.workers, progress=False)
        write_s = time.perf_counter() - t
        kw = dict(train=True, batch_size=args.batch, img_size=args.size, num_workers=args.workers, seed=0)
        ffcv = build_loader(tmp / "train.beton", backend="ffcv", **kw)
        torch_dl = build_loader(tmp / "imgs", backend="torch", **kw)
        throughput(ffcv, 1)  # warm-up: numba compiles the pipeline on the first epoch
        throughput(torch_dl, 1)
        ffcv_ips = throughput(ffcv, args.epochs)
        torch_ips = throughput(torch_dl, args.epochs)
    print(json.dumps({
        "benchmark": "data_loader_throughput", "images": args.images, "workers": args.workers,
        "size": args.size, "batch": args.batch, "epochs_timed": args.epochs,
        "ffcv_images_per_sec": ffcv_ips, "torch_images_per_sec": torch_ips, "ffcv_over_torch": ffcv_ips / torch_ips,
        "generate_s": gen_s, "write_beton_s": write_s,
    }))


if __name__ == "__main__":
    sys.exit(main())
