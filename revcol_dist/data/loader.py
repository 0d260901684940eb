"""Train/val data streams over FFCV .beton files, or a torch DataLoader over an ImageFolder
when FFCV is not installed. Both read in the order ShardedOrder gives (deterministic per
seed and epoch, sharded across ranks, resumable mid-epoch) and yield
``(images [B, 3, S, S] float normalised, labels [B] int64, indices [B] int64)``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .ffcv_support import ffcv_available, warn_fallback
from .folder import DataError, scan_image_folder
from .order import ShardedOrder
from .transforms import IMAGENET_MEAN, IMAGENET_STD, RRC_SCALE, RandAugment, augment_batch, center_crop, load_rgb, normalize, random_erasing, train_crop


class DataStream:
    def __init__(self, order: ShardedOrder, classes: Sequence[str], train: bool, randaug: Optional[RandAugment],
                 erasing: float, mean, std, device) -> None:
        self.order = order
        self.classes = tuple(classes)
        self.train = train
        self.randaug = randaug
        self.erasing = erasing
        self.mean, self.std = mean, std
        self.device = device
        self.skipped = 0  # corrupt images skipped so far (fallback path; the writer filters for FFCV)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return self.order.batches_in_epoch(self.order.epoch) - self.order.batches_done

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)

    def global_position(self) -> dict:
        return self.order.global_position()

    def load_global_position(self, pos: dict, allow_batch_change: bool = False) -> None:
        self.order.load_global_position(pos, allow_batch_change)

    def _finish(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor):
        # every draw of a sample's augmentation is keyed by (seed, epoch, its index): the same
        # pixels whatever rank, batch or resume reads it
        ids = index.tolist() if self.train and (self.randaug is not None or self.erasing > 0) else []
        seed, epoch = self.order.seed, self.order.epoch
        if self.train and self.randaug is not None:
            rngs = [np.random.default_rng([seed, epoch, i, 0x52414E44]) for i in ids]
            images = augment_batch(images.cpu(), rngs, self.randaug)
        if self.device is not None:
            images, labels, index = (t.to(self.device, non_blocking=True) for t in (images, labels, index))
        x = normalize(images, self.mean, self.std)
        if self.train and self.erasing > 0:
            x = random_erasing(x, self.erasing, [np.random.default_rng([seed, epoch, i, 0x45524153]) for i in ids])
        return x, labels.long(), index.long()

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch = self.order.epoch
        for images, labels, index in self._batches(self.order.remaining_indices()):
            out = self._finish(images, labels, index)
            self.order.advance()
            yield out
            if self.order.epoch != epoch:
                return

    def _batches(self, indices: np.ndarray):
        raise NotImplementedError


class FFCVStream(DataStream):
    def __init__(self, beton: Path, size: int, num_workers: int, scale, hflip: bool, **kw) -> None:
        super().__init__(**kw)
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.traversal_order.base import TraversalOrder
        from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

        from .ffcv_seeded import seeded_rrc_decoder

        class _Given(TraversalOrder):
            """The order ShardedOrder computed; FFCV's own orders cannot resume mid-epoch."""

            def __init__(self) -> None:
                self.current = np.zeros(0, dtype=np.uint64)

            def __call__(self, loader):  # FFCV instantiates orders by calling them
                TraversalOrder.__init__(self, loader)
                return self

            def sample_order(self, epoch: int):
                return self.current

        self._decoder, self._compiled_epoch = None, 0  # the Loader compiles its pipeline at epoch 0
        if self.train:  # seeded by (seed, epoch, index): the same crops in every run and at every layout
            self._decoder = seeded_rrc_decoder(size, scale, flip=hflip, seed=self.order.seed)
            image = [self._decoder, ToTensor(), ToTorchImage(channels_last=False)]
        else:
            image = [CenterCropRGBImageDecoder((size, size), ratio=224 / 256), ToTensor(), ToTorchImage(channels_last=False)]
        ints = [IntDecoder(), ToTensor(), Squeeze(1)]
        self._given = _Given()
        self._loader = Loader(str(beton), batch_size=self.order.batch_size, num_workers=max(1, num_workers),
                              order=self._given, drop_last=self.order.drop_last, os_cache=True,
                              pipelines={"image": image, "label": ints, "index": list(ints)}, seed=self.order.seed)

    def _batches(self, indices: np.ndarray):
        self._given.current = indices.astype(np.uint64)
        self._loader.first_traversal_order = self._given.current  # FFCV sizes the epoch from it
        if self._decoder is not None:  # the crops' epoch is compiled in: recompile when it changes
            self._decoder.epoch = self.order.epoch
            self._loader.recompile = self.order.epoch != self._compiled_epoch
            self._compiled_epoch = self.order.epoch
        for images, labels, index in self._loader:
            yield images, labels.view(-1), index.view(-1)


class _Files(Dataset):
    def __init__(self, samples: Sequence[Tuple[str, int]], size: int, train: bool, seed: int, scale, hflip: bool) -> None:
        self.samples, self.size, self.train, self.seed, self.scale = samples, size, train, seed, tuple(scale)
        self.hflip = hflip
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            img = load_rgb(path)
        except Exception:
            return None, label, i  # corrupt or unreadable: skipped and counted by the stream
        if self.train:
            arr = train_crop(img, self.size, np.random.default_rng([self.seed, self.epoch, i]), self.hflip, self.scale)
        else:
            arr = center_crop(img, self.size)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), label, i


def _collate(items):
    good = [it for it in items if it[0] is not None]
    bad = len(items) - len(good)
    if not good:
        return None, None, None, bad
    return (torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]),
            torch.tensor([g[2] for g in good]), bad)


class TorchStream(DataStream):
    def __init__(self, samples: Sequence[Tuple[str, int]], size: int, num_workers: int, scale, hflip: bool, **kw) -> None:
        super().__init__(**kw)
        self._files = _Files(samples, size, self.train, self.order.seed, scale, hflip)
        self._workers = num_workers

    def _batches(self, indices: np.ndarray):
        self._files.epoch = self.order.epoch
        bs = self.order.batch_size
        batches = [indices[i : i + bs].tolist() for i in range(0, len(indices), bs)]
        if self.order.drop_last:
            batches = [b for b in batches if len(b) == bs]
        loader = DataLoader(self._files, batch_sampler=batches, num_workers=self._workers, collate_fn=_collate,
                            persistent_workers=False)
        for images, labels, index, bad in loader:
            self.skipped += bad
            if images is None:
                self.order.advance()  # a batch of only broken files: nothing to yield
                continue
            yield images, labels, index


def build_loader(
    source: str | Path,
    *,
    train: bool,
    batch_size: int,
    img_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    randaug: bool = False,
    erasing: float = 0.0,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    backend: str = "auto",
    device=None,
    drop_last: Optional[bool] = None,
    crop_scale=RRC_SCALE,
    hflip: bool = True,
    distributed: bool = False,
) -> DataStream:
    """source: a .beton written by ``revcol_dist.data.write`` or an ImageFolder root.
    batch_size is per rank; ``drop_last`` defaults to train. ``distributed=True`` takes rank
    and world size from the initialised torch.distributed group (all ranks of all nodes)."""
    source = Path(source)
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise DataError("distributed=True needs torch.distributed initialised first (init_process_group)")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if backend not in ("auto", "ffcv", "torch"):
        raise ValueError(f"backend must be auto, ffcv or torch, got {backend!r}")
    use_ffcv = source.suffix == ".beton" and backend != "torch" and ffcv_available()
    if backend == "ffcv" and not use_ffcv:
        raise DataError("backend='ffcv' needs FFCV installed and a .beton source")
    if source.suffix == ".beton":
        meta_path = Path(str(source) + ".json")
        if not source.is_file():
            raise DataError(f".beton file not found: {source}")
        if not meta_path.is_file():
            raise DataError(f"{meta_path} is missing: re-create {source.name} with python -m revcol_dist.data.write")
        meta = json.loads(meta_path.read_text())
        classes, num = meta["classes"], meta["num_samples"]
        samples: List[Tuple[str, int]] = []
        if not use_ffcv:
            if backend == "auto" and not ffcv_available():
                warn_fallback()
            labels = _labels_of(meta)
            samples = list(zip(meta["files"], labels))
    else:
        if backend == "auto" and not ffcv_available():
            warn_fallback()
        folder = scan_image_folder(source)
        classes, samples, num = folder.classes, list(folder.samples), len(folder)
    order = ShardedOrder(num, batch_size, rank, world_size, seed, shuffle=train,
                         drop_last=train if drop_last is None else drop_last)
    kw = dict(order=order, classes=classes, train=train, randaug=RandAugment() if randaug else None,
              erasing=erasing, mean=mean, std=std, device=device)
    if use_ffcv:
        from .write import check_layout

        check_layout(source)
        return FFCVStream(source, img_size, num_workers, crop_scale, hflip, **kw)
    return TorchStream(samples, img_size, num_workers, crop_scale, hflip, **kw)


def _labels_of(meta: dict) -> List[int]:
    """Labels of the files a .beton holds, from the folder each file sits in."""
    index = {c: i for i, c in enumerate(meta["classes"])}
    root = Path(meta["source"])
    return [index[Path(f).relative_to(root).parts[0]] for f in meta["files"]]
