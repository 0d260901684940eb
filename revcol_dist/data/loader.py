"""Train/val data streams over FFCV .beton files, or a torch DataLoader over an ImageFolder
when FFCV is not installed. Both read in the order ShardedOrder gives (deterministic per
seed and epoch, sharded across ranks, resumable mid-epoch) and yield
``(images [B, 3, S, S] float normalised, labels [B] int64, indices [B] int64)``.

Every per-image step runs off the training thread: decoding, crop, flip and RandAugment in
FFCV's worker threads (compiled operations) or the DataLoader's worker processes; then
normalisation and erasing either there too (``finish="workers"``, the default without a GPU)
or batched on the device after uint8 crossed to it (``finish="device"``, the default when the
device is a GPU). Every draw is a function of (seed, epoch, sample index)."""

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
from . import draws
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, RRC_SCALE, RandAugment, center_crop, erase_batch, erase_image, load_rgb,
                         normalize, train_crop)

FINISH = ("auto", "workers", "device")


def _is_gpu(device) -> bool:
    return device is not None and torch.device(device).type != "cpu"


class DataStream:
    def __init__(self, order: ShardedOrder, classes: Sequence[str], train: bool, randaug: Optional[RandAugment],
                 erasing: float, mean, std, device, size: int, finish: str = "auto") -> None:
        self.order = order
        self.classes = tuple(classes)
        self.train = train
        self.randaug = randaug
        self.erasing = erasing if train else 0.0
        self.mean, self.std = mean, std
        self.device = device
        self.size = size
        self.finish = ("device" if _is_gpu(device) else "workers") if finish == "auto" else finish
        self.skipped = 0  # corrupt images skipped so far (fallback path; the writer filters for FFCV)
        self._bank = None
        if self.finish == "device":  # constants copied once, here, not inside a step
            target = torch.device(device if device is not None else "cpu")
            normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8, device=target), mean, std)  # caches mean/std there
            if self.erasing > 0:
                bank = draws.noise_bank(self.order.seed, draws.bank_size(3, size, size))
                self._bank = torch.from_numpy(np.array(bank)).to(target)

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
        """uint8 batches are normalised and erased here, on the device, in a few batched ops
        with no host sync; float batches were finished by the workers."""
        if self.device is not None:
            images, labels, index = (t.to(self.device, non_blocking=True) for t in (images, labels, index))
        if images.dtype == torch.uint8:
            images = normalize(images, self.mean, self.std)
            if self.erasing > 0:
                images = erase_batch(images, index, self.order.seed, self.order.epoch, self.erasing, self._bank)
        return images, labels.long(), index.long()

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
    def __init__(self, beton: Path, num_workers: int, scale, hflip: bool, **kw) -> None:
        super().__init__(**kw)
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.traversal_order.base import TraversalOrder
        from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

        from .ffcv_ops import NormalizeEraseOp, RandAugmentOp
        from .ffcv_runtime import RuntimeInt
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

        size, seed = self.size, self.order.seed
        self._epoch = RuntimeInt(self.order.epoch)  # read by the compiled code at run time
        if self.train:  # seeded by (seed, epoch, index): the same crops in every run and at every layout
            image = [seeded_rrc_decoder(size, scale, flip=hflip, seed=seed, epoch=self._epoch)]
        else:
            image = [CenterCropRGBImageDecoder((size, size), ratio=224 / 256)]
        if self.train and self.randaug is not None:
            ra = self.randaug
            image.append(RandAugmentOp(self._epoch, seed, ra.num_ops, ra.magnitude, ra.std, ra.prob))
        to_gpu = [ToDevice(torch.device(self.device), non_blocking=True)] if _is_gpu(self.device) else []
        if self.finish == "workers":  # (with a GPU, copied on FFCV's streams, which guard its buffers)
            image += [NormalizeEraseOp(self._epoch, seed, self.mean, self.std, self.erasing), ToTensor()] + to_gpu
        else:  # uint8 crosses to the device (pinned, on FFCV's copy streams); normalised there
            image += [ToTensor()] + to_gpu + [ToTorchImage(channels_last=bool(to_gpu))]
        ints = [IntDecoder(), ToTensor(), Squeeze(1)] + to_gpu
        self._given = _Given()
        self._warm_up(image)
        self._loader = Loader(str(beton), batch_size=self.order.batch_size, num_workers=max(1, num_workers),
                              order=self._given, drop_last=self.order.drop_last, os_cache=True,
                              pipelines={"image": image, "label": ints, "index": list(ints)}, seed=seed)

    def _batches(self, indices: np.ndarray):
        self._given.current = indices.astype(np.uint64)
        self._loader.first_traversal_order = self._given.current  # FFCV sizes the epoch from it
        self._epoch.value = self.order.epoch  # before FFCV's thread starts on this epoch
        it = iter(self._loader)
        try:
            for images, labels, index in it:
                yield images, labels.view(-1), index.view(-1)
        finally:  # a consumer that stops mid-epoch: FFCV's thread would otherwise run on, holding its buffers
            it.close()
            it.join(timeout=5)

    @staticmethod
    def _warm_up(ops) -> None:
        """Compile (or load from the disk cache) the augmentation kernels here, on the calling
        thread: an error surfaces here rather than hanging FFCV's thread, and the first batch
        does not wait for a compile."""
        from . import augment_numba as K
        from .ffcv_ops import NormalizeEraseOp, RandAugmentOp

        img, idx = np.zeros((1, 8, 8, 3), dtype=np.uint8), np.zeros(1, dtype=np.uint64)
        for op in ops:
            if isinstance(op, RandAugmentOp):
                K.randaugment_batch(img, np.empty_like(img), idx, np.uint64(0), 0, op.num_ops, 9.0, 0.5, 0.5)
            if isinstance(op, NormalizeEraseOp):
                bank = np.zeros(3 * 64 * 4, dtype=np.float32)
                K.normalize_erase_batch(img, np.empty((1, 3, 8, 8), np.float32), op.lut, bank, idx, np.uint64(0), 0, 0.5)


class _Files(Dataset):
    """Decode, crop, flip, RandAugment and (finish="workers") normalise and erase one file, in
    a DataLoader worker; the draws are the sample's, as on the FFCV path."""

    def __init__(self, samples: Sequence[Tuple[str, int]], stream: "DataStream", scale, hflip: bool) -> None:
        self.samples, self.size, self.train, self.seed = samples, stream.size, stream.train, stream.order.seed
        self.scale, self.hflip, self.randaug = tuple(scale), hflip, stream.randaug if stream.train else None
        self.finish_here = stream.finish == "workers"
        self.mean, self.std, self.erasing = stream.mean, stream.std, stream.erasing
        self.bank = None
        if self.finish_here and self.erasing > 0:
            self.bank = torch.from_numpy(np.array(draws.noise_bank(self.seed, draws.bank_size(3, self.size, self.size))))
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
        x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        if self.randaug is not None:
            x = self.randaug(x, draws.sample_key(self.seed, self.epoch, i, draws.RANDAUG))
        if self.finish_here:
            x = normalize(x[None], self.mean, self.std)[0]
            if self.erasing > 0:
                x = erase_image(x, draws.sample_key(self.seed, self.epoch, i, draws.ERASE), self.erasing, self.bank)
        return x, label, i


def _collate(items):
    good = [it for it in items if it[0] is not None]
    bad = len(items) - len(good)
    if not good:
        return None, None, None, bad
    return (torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]),
            torch.tensor([g[2] for g in good]), bad)


class TorchStream(DataStream):
    def __init__(self, samples: Sequence[Tuple[str, int]], num_workers: int, scale, hflip: bool, **kw) -> None:
        super().__init__(**kw)
        self._files = _Files(samples, self, scale, hflip)
        self._workers = num_workers

    def _batches(self, indices: np.ndarray):
        self._files.epoch = self.order.epoch
        bs = self.order.batch_size
        batches = [indices[i : i + bs].tolist() for i in range(0, len(indices), bs)]
        if self.order.drop_last:
            batches = [b for b in batches if len(b) == bs]
        loader = DataLoader(self._files, batch_sampler=batches, num_workers=self._workers, collate_fn=_collate,
                            persistent_workers=False, pin_memory=_is_gpu(self.device))  # prefetched by the workers
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
    finish: str = "auto",
) -> DataStream:
    """source: a .beton written by ``revcol_dist.data.write`` or an ImageFolder root.
    batch_size is per rank; ``drop_last`` defaults to train. ``distributed=True`` takes rank
    and world size from the initialised torch.distributed group (all ranks of all nodes).
    ``finish``: where normalisation and erasing run, "workers" or "device" (uint8 crosses to
    the device); "auto" picks "device" for a GPU device, else "workers"."""
    source = Path(source)
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise DataError("distributed=True needs torch.distributed initialised first (init_process_group)")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if finish not in FINISH:
        raise ValueError(f"finish must be one of {', '.join(FINISH)}, got {finish!r}")
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
              erasing=erasing, mean=mean, std=std, device=device, size=img_size, finish=finish)
    if use_ffcv:
        from .write import check_layout

        check_layout(source)
        return FFCVStream(source, num_workers, crop_scale, hflip, **kw)
    return TorchStream(samples, num_workers, crop_scale, hflip, **kw)


def _labels_of(meta: dict) -> List[int]:
    """Labels of the files a .beton holds, from the folder each file sits in."""
    index = {c: i for i, c in enumerate(meta["classes"])}
    root = Path(meta["source"])
    return [index[Path(f).relative_to(root).parts[0]] for f in meta["files"]]
