"""RandAugment and normalise+erase as FFCV operations: compiled by FFCV into its pipeline and
run, a batch at a time, in its worker threads (a prange over the batch's images), so the
training thread receives finished batches. Each image's draws come from (seed, epoch, its
global index); the epoch is a constant of the compiled code, so the stream sets ``op.epoch``
and has FFCV recompile when it changes (as for the seeded crop decoder)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation

from . import augment_numba as K
from .draws import bank_size, noise_bank
from .transforms import normalize


class RandAugmentOp(Operation):
    """In place on the decoder's HWC uint8 images; a scratch image per sample."""

    epoch = 0

    def __init__(self, seed: int, num_ops: int, magnitude: float, std: float, prob: float) -> None:
        super().__init__()
        self.seed, self.num_ops, self.magnitude, self.std, self.prob = seed % 2**64, num_ops, magnitude, std, prob

    def generate_code(self):
        loop = Compiler.get_iterator()
        seed, epoch, n, mag, std, prob = self.seed, self.epoch, self.num_ops, self.magnitude, self.std, self.prob
        augment = K.randaugment

        def randaugment(images, scratch, indices):
            for k in loop(images.shape[0]):
                augment(images[k], scratch[k], seed, epoch, indices[k], n, mag, std, prob)
            return images

        randaugment.is_parallel = True
        randaugment.with_indices = True
        return randaugment

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class NormalizeEraseOp(Operation):
    """HWC uint8 -> CHW float32 normalised, then the sample's erasing box (prob 0: none)."""

    epoch = 0

    def __init__(self, seed: int, mean, std, prob: float) -> None:
        super().__init__()
        self.seed, self.prob = seed % 2**64, float(prob)
        # the table is torch's own arithmetic (transforms.normalize), so both paths agree exactly
        self.lut = normalize(torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256), mean, std)
        self.lut = np.ascontiguousarray(self.lut.view(3, 256).numpy())
        self.bank = None

    def generate_code(self):
        loop = Compiler.get_iterator()
        seed, epoch, prob, lut, bank = self.seed, self.epoch, self.prob, self.lut, self.bank
        finish = K.normalize_erase

        def normalize_erase(images, out, indices):
            for k in loop(images.shape[0]):
                finish(images[k], out[k], lut, bank, seed, epoch, indices[k], prob)
            return out[: images.shape[0]]

        normalize_erase.is_parallel = True
        normalize_erase.with_indices = True
        return normalize_erase

    def declare_state_and_memory(self, previous_state):
        h, w, c = previous_state.shape
        self.bank = np.array(noise_bank(self.seed, bank_size(c, h, w)))
        return (replace(previous_state, jit_mode=True, shape=(c, h, w), dtype=np.dtype("float32")),
                AllocationQuery((c, h, w), np.dtype("float32")))
