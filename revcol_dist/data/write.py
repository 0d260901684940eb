"""Write an ImageFolder tree to an FFCV .beton file.

python -m revcol_dist.data.write --src DIR --out train.beton --max-res 256 --jpeg-quality 90 --workers N

Every image is opened and converted once before writing; unreadable or corrupt files are
skipped and counted, never fatal. The file is written under a temporary name and renamed
when complete; a sidecar ``<out>.json`` records the field layout, classes and counts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from .folder import DataError, scan_image_folder

# The layout this project writes and reads: name -> FFCV field class name.
FIELD_LAYOUT = {"image": "RGBImageField", "label": "IntField", "index": "IntField"}


def _check(path: str) -> Optional[str]:
    """None if the image decodes, else the reason."""
    try:
        with Image.open(path) as im:
            im.convert("RGB").load()
        return None
    except Exception as e:  # PIL raises many types for broken files
        return f"{type(e).__name__}: {e}"


class _Samples:
    """Indexable (image, label, index) for FFCV's writer; images resized to max_res."""

    def __init__(self, items: List[Tuple[str, int]], max_res: Optional[int]) -> None:
        self.items, self.max_res = items, max_res

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        with Image.open(path) as im:
            img = im.convert("RGB")
        if self.max_res and max(img.size) > self.max_res:
            s = self.max_res / max(img.size)
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)
        return np.asarray(img), label, i


def write_beton(
    src: str | os.PathLike,
    out: str | os.PathLike,
    max_res: Optional[int] = 256,
    jpeg_quality: int = 90,
    workers: int = 1,
    mode: str = "jpg",
    progress: bool = True,
) -> dict:
    """Returns the summary also written to ``<out>.json``."""
    from .ffcv_support import INSTALL_HINT, ffcv_available

    if not ffcv_available():
        raise DataError("writing .beton files needs FFCV. " + INSTALL_HINT.split(": ", 1)[1])
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    folder = scan_image_folder(src)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped = []
    good: List[Tuple[str, int]] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        checks = pool.map(_check, [p for p, _ in folder.samples])
        for (path, label), problem in _progress(zip(folder.samples, checks), len(folder), "checking images", progress):
            if problem is None:
                good.append((path, label))
            else:
                skipped.append({"path": path, "reason": problem})
    if not good:
        raise DataError(f"no readable image in {src} ({len(skipped)} files failed to decode)")
    tmp = out.with_name(f".{out.name}.tmp")
    fields = {
        "image": RGBImageField(write_mode=mode, max_resolution=max_res, jpeg_quality=jpeg_quality),
        "label": IntField(),
        "index": IntField(),
    }
    writer = DatasetWriter(str(tmp), fields, num_workers=max(1, workers))
    with _ffcv_bar(progress):
        writer.from_indexed_dataset(_Samples(good, max_res), chunksize=64)
    os.replace(tmp, out)
    summary = {
        "fields": FIELD_LAYOUT,
        "classes": list(folder.classes),
        "num_samples": len(good),
        "skipped": skipped,
        "source": str(Path(src).resolve()),
        "max_res": max_res,
        "mode": mode,
        "jpeg_quality": jpeg_quality,
        "files": [p for p, _ in good],
    }
    Path(str(out) + ".json").write_text(json.dumps(summary, indent=1))
    return summary


@contextlib.contextmanager
def _ffcv_bar(enabled: bool):
    """FFCV's writer draws its own tqdm bar whatever it is asked: off with progress=False."""
    import ffcv.writer
    import tqdm

    saved = ffcv.writer.tqdm
    if not enabled:
        ffcv.writer.tqdm = functools.partial(tqdm.tqdm, disable=True)
    try:
        yield
    finally:
        ffcv.writer.tqdm = saved


def _progress(it, total: int, what: str, enabled: bool):
    if not enabled:
        yield from it
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as p:
        task = p.add_task(what, total=total)
        for x in it:
            yield x
            p.advance(task)


def check_layout(path: str | os.PathLike) -> None:
    """Fail clearly on a .beton whose fields are not the layout this project reads."""
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise DataError(f".beton file not found: {path}")
    try:
        handlers = Reader(str(path)).handlers
    except Exception as e:
        raise DataError(f"{path} is not a readable FFCV .beton file ({type(e).__name__}: {e})") from None
    found = {name: type(h).__name__ for name, h in handlers.items()}
    if found != FIELD_LAYOUT:
        raise DataError(
            f"{path} has fields {found}, expected {FIELD_LAYOUT}: re-create it with "
            f"python -m revcol_dist.data.write --src <ImageFolder> --out {path.name}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write an ImageFolder tree to an FFCV .beton file.")
    ap.add_argument("--src", required=True, help="ImageFolder root: one sub-folder per class")
    ap.add_argument("--out", required=True, help="output .beton path")
    ap.add_argument("--max-res", type=int, default=256, help="longest side after resizing (0: keep)")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--mode", choices=("jpg", "raw", "smart", "proportion"), default="jpg")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    try:
        s = write_beton(args.src, args.out, args.max_res or None, args.jpeg_quality, args.workers, args.mode)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {s['num_samples']} images in {len(s['classes'])} classes to {args.out}"
          + (f"; skipped {len(s['skipped'])} unreadable (listed in {args.out}.json)" if s["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
