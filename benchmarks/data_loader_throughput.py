"""Images/s delivered to the training thread by the recipe's training pipeline (crop, flip,
RandAugment rand-m9-mstd0.5-inc1, erasing 0.25, normalisation) through our FFCV stream,
against (1) a torch DataLoader doing the same in PIL in its workers, the way timm's loader
does (``pil_loader.py``), and (2) our own stream with crop and flip alone; same worker count,
over a generated folder of real-photo JPEGs. Also the training thread's own CPU time per
batch (``time.thread_time``) as a fraction of the batch's delivery time.

python benchmarks/data_loader_throughput.py [--images 1600] [--workers 2] [--size 224]
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


def make_folder(root: Path, n: int, seed: int = 0, sides=(256, 400)) -> None:
    """n JPEGs, each side 256-400 px, cut from scikit-image's bundled photos, 10 classes."""
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
        out = (int(rng.integers(sides[0], sides[1] + 1)), int(rng.integers(sides[0], sides[1] + 1)))
        crop = img.resize(out, Image.BICUBIC, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(root / f"class{i % 10}" / f"{i:05d}.jpg", quality=90)


def throughput(stream, epochs: int) -> dict:
    """Images/s over `epochs` epochs, and the consuming (training) thread's own CPU time."""
    n, batches, t0, c0 = 0, 0, time.perf_counter(), time.thread_time()
    for _ in range(epochs):
        for batch in stream:
            n += len(batch[1])
            batches += 1
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return {"images_per_sec": n / wall, "batch_ms": 1e3 * wall / batches, "thread_ms_per_batch": 1e3 * cpu / batches,
            "thread_fraction": cpu / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1600)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pil_loader import pil_loader
    from revcol_dist.data.loader import build_loader
    from revcol_dist.data.write import write_beton

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        make_folder(tmp / "imgs", args.images)
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        write_beton(tmp / "imgs", tmp / "train.beton", max_res=400, jpeg_quality=90, workers=args.workers, progress=False)
        write_s = time.perf_counter() - t
        kw = dict(train=True, batch_size=args.batch, img_size=args.size, num_workers=args.workers, seed=0, backend="ffcv")
        recipe = build_loader(tmp / "train.beton", randaug=True, erasing=0.25, **kw)
        crop_flip = build_loader(tmp / "train.beton", **kw)
        pil = pil_loader(tmp / "imgs", args.size, args.batch, args.workers)
        for s_ in (recipe, crop_flip):
            throughput(s_, 1)  # warm-up: numba compiles the pipeline on the first epoch
        throughput(pil, 1)
        res = {"recipe": throughput(recipe, args.epochs), "crop_flip": throughput(crop_flip, args.epochs),
               "pil_dataloader": throughput(pil, args.epochs)}
    r, c, p = (res[k]["images_per_sec"] for k in ("recipe", "crop_flip", "pil_dataloader"))
    print(json.dumps({
        "benchmark": "data_loader_throughput", "images": args.images, "workers": args.workers,
        "size": args.size, "batch": args.batch, "epochs_timed": args.epochs, **res,
        "recipe_over_pil": r / p, "recipe_over_crop_flip": c and r / c,
        "recipe_thread_fraction": res["recipe"]["thread_fraction"],
        "targets_met": bool(r / p >= 1.2 and r / c >= 0.75 and res["recipe"]["thread_fraction"] <= 0.05),
        "generate_s": gen_s, "write_beton_s": write_s,
    }))


if __name__ == "__main__":
    sys.exit(main())
