"""From the config's data section to train and val streams."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from .digits import MEAN, STD, prepare_digits
from .folder import DataError
from .loader import DataStream, build_loader
from .transforms import IMAGENET_MEAN, IMAGENET_STD


def prepare_data(data) -> dict:
    """Paths of the train and val sources, creating the embedded digits set on first use."""
    if data.dataset == "digits":
        return prepare_digits(data.root, data.img_size, write_beton=data.backend != "torch")
    root = Path(data.dataset)
    paths = {}
    for split in ("train", "val"):
        beton, folder = root / f"{split}.beton", root / split
        paths[split] = beton if beton.is_file() and data.backend != "torch" else folder
        if not paths[split].exists():
            raise DataError(f"{root} has neither {beton.name} nor {split}/: expected one of them")
    return paths


def build_streams(data, global_batch: int, seed: int, rank: int = 0, world_size: int = 1, device=None,
                  eval_batch: Optional[int] = None) -> Tuple[DataStream, DataStream]:
    """The training and validation streams of this rank; ``eval_batch``: the validation's
    global batch (None: ``global_batch``)."""
    eval_batch = global_batch if eval_batch is None else eval_batch
    for name, batch in (("train.batch_size", global_batch), ("train.eval_batch_size", eval_batch)):
        if batch % world_size:
            raise DataError(f"{name}={batch} is not divisible by the {world_size} data-parallel ranks: "
                            f"set it to a multiple of {world_size}")
    paths = prepare_data(data)
    if data.dataset == "digits":
        mean, std = (MEAN,) * 3, (STD,) * 3
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    common = dict(batch_size=global_batch // world_size, img_size=data.img_size, rank=rank, world_size=world_size,
                  seed=seed, num_workers=data.num_workers, mean=mean, std=std, backend=data.backend, device=device)
    train = build_loader(paths["train"], train=True, randaug=data.randaug, erasing=data.erasing,
                         crop_scale=(data.min_crop_scale, 1.0), hflip=data.hflip, **common)
    val = build_loader(paths["val"], train=False, **dict(common, batch_size=eval_batch // world_size))
    return train, val
