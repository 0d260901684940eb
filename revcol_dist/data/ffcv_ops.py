"""RandAugment and normalise+erase as FFCV operations. FFCV runs them in its worker thread,
a batch at a time, as uncompiled operations that call kernels compiled once (and cached on
disk) in ``augment_numba``, parallel over the batch's images, without the GIL: the training
thread receives finished batches. Each image's draws come from (seed, epoch, its global
index); the epoch is the stream's ``RuntimeInt``, written before each epoch."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import torch
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation

from . import augment_numba as K
from .draws import bank_size, noise_bank
from .ffcv_runtime import RuntimeInt
from .transforms import normalize


# numba's "workqueue" threading layer (the fallback where neither TBB nor OpenMP is found)
# aborts when two threads launch parallel kernels at once, e.g. two streams' FFCV threads
# overlapping; one stream runs at a time in training, so serialising costs nothing there.
_LAUNCH = threading.Lock()


class RandAugmentOp(Operation):
    """In place on the decoder's HWC uint8 images; a scratch image per sample."""

    def __init__(self, epoch: RuntimeInt, seed: int, num_ops: int, magnitude: float, std: float, prob: float) -> None:
        super().__init__()
        self.epoch = epoch
        self.seed, self.num_ops, self.magnitude, self.std, self.prob = seed % 2**64, num_ops, magnitude, std, prob

    def generate_code(self):
        op = self

        def randaugment(images, scratch, indices):
            with _LAUNCH:
                K.randaugment_batch(images, scratch, indices, np.uint64(op.seed), op.epoch.value, op.num_ops,
                                    float(op.magnitude), float(op.std), float(op.prob))
            return images

        randaugment.with_indices = True
        return randaugment

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=False), AllocationQuery(previous_state.shape, previous_state.dtype)


class NormalizeEraseOp(Operation):
    """HWC uint8 -> CHW float32 normalised, then the sample's erasing box (prob 0: none)."""

    def __init__(self, epoch: RuntimeInt, seed: int, mean, std, prob: float) -> None:
        super().__init__()
        self.epoch = epoch
        self.seed, self.prob = seed % 2**64, float(prob)
        # the table is torch's own arithmetic (transforms.normalize), so both paths agree exactly
        lut = normalize(torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256), mean, std)
        self.lut = np.ascontiguousarray(lut.view(3, 256).numpy())
        self.bank = None

    def generate_code(self):
        op = self

        def normalize_erase(images, out, indices):
            out = out[: images.shape[0]]
            with _LAUNCH:
                K.normalize_erase_batch(images, out, op.lut, op.bank, indices, np.uint64(op.seed), op.epoch.value, op.prob)
            return out

        normalize_erase.with_indices = True
        return normalize_erase

    def declare_state_and_memory(self, previous_state):
        h, w, c = previous_state.shape
        self.bank = np.array(noise_bank(self.seed, bank_size(c, h, w)))
        return (replace(previous_state, jit_mode=False, shape=(c, h, w), dtype=np.dtype("float32")),
                AllocationQuery((c, h, w), np.dtype("float32")))
