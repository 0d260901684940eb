"""ImageFolder trees (one sub-folder per class), scanned with errors that say what to fix."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """Data that cannot be used; the message names the path and the fix."""


@dataclass(frozen=True)
class ImageFolder:
    root: Path
    classes: Tuple[str, ...]
    samples: Tuple[Tuple[str, int], ...]  # (path, class index), sorted

    def __len__(self) -> int:
        return len(self.samples)


def scan_image_folder(root: str | os.PathLike) -> ImageFolder:
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: expected an ImageFolder tree (one sub-folder per class)")
    try:
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except PermissionError as e:
        raise DataError(f"cannot read {root}: {e.strerror}") from None
    if not class_dirs:
        raise DataError(f"{root} has no class sub-folders: expected {root}/<class>/<image> files")
    samples: List[Tuple[str, int]] = []
    unreadable = []
    for idx, d in enumerate(class_dirs):
        try:
            files = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        except PermissionError:
            unreadable.append(str(d))
            continue
        samples.extend((str(f), idx) for f in files)
    if unreadable:
        raise DataError(f"cannot read class folder(s) {unreadable[:3]}: check permissions")
    if not samples:
        raise DataError(
            f"{root} has class folders ({', '.join(d.name for d in class_dirs[:5])}) but no images "
            f"with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    return ImageFolder(root, tuple(d.name for d in class_dirs), tuple(samples))
