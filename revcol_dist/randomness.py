"""Random draws that are a function of what they are for, not of who draws them or when.

A data-parallel rank, a pipeline stage, a micro-batch of ``grad_accum`` and a reversible
recomputation must all draw a sample's drop-path mask alike, or a run's trajectory depends on
its layout. A draw here is a counter-based hash of (seed, step, the sample's global index,
stream), where the stream names the consumer (a module's name, "mixup", ...). It runs as a
few integer kernels on the device: no generator state, no host sync, nothing to replay.

The trainer declares the keys of a micro-batch with ``keyed(SampleKeys(...))``; consumers ask
``current()``. Without keys (a model called directly) they fall back to torch's generator."""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union

import torch

_M32 = 0xFFFFFFFF
# multipliers below 2**31: a uint32 times one stays inside int64 (no overflow, on any device)
_K1, _K2 = 0x7FEB352D, 0x2C1B3C6D


def _mix_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * _K1) & _M32
    x ^= x >> 15
    x = (x * _K2) & _M32
    return x ^ (x >> 16)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """The same 32-bit mix, elementwise on an int64 tensor holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * _K1) & _M32
    x = x ^ (x >> 15)
    x = (x * _K2) & _M32
    return x ^ (x >> 16)


def stream_id(name: str) -> int:
    """A stable 32-bit id for a consumer's name (the same in every process and layout)."""
    return zlib.crc32(name.encode())


def param_seed(seed: int, name: str) -> int:
    """A 64-bit generator seed for the initialisation of parameter ``name``."""
    stream = stream_id(name)
    return (_mix_int(_mix_int(seed) ^ stream) << 32) | _mix_int(_mix_int(seed + 1) ^ stream)


Step = Union[int, torch.Tensor]  # an optimizer step: a host int, or a 0-d int64 tensor on the device


def _mix_either(x: Step) -> Step:
    """``_mix`` of a tensor, ``_mix_int`` of an int: the same bits."""
    return _mix(x) if isinstance(x, torch.Tensor) else _mix_int(x)


def _step_mix(seed: int, step: Step) -> Step:
    """The (seed, step) part of every draw's key. A step given as a device tensor stays one (a
    captured CUDA graph reads it there, where a host int would be baked into the kernels);
    the bits are the same either way."""
    if isinstance(step, torch.Tensor):
        return _mix((step & _M32) ^ _mix_int(seed))
    return _mix_int(_mix_int(seed) ^ step)


def uniform(seed: int, step: Step, ids: torch.Tensor, stream: int) -> torch.Tensor:
    """float32 in [0, 1), one per entry of ``ids`` (int64 global sample indices), on their device."""
    base = _mix_either(_step_mix(seed, step) ^ stream)
    after = _mix_either((base + 1) & _M32)
    h = _mix((ids & _M32) ^ base)
    h = _mix(h ^ ((ids >> 32) & _M32) ^ after)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


_CONSTANTS: Dict[tuple, torch.Tensor] = {}


def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``, made once (its copy is the only transfer)."""
    key = (values, dtype, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype).to(device)
    return _CONSTANTS[key]


def uniform_streams(seed: int, step: Step, ids: torch.Tensor, streams: Tuple[int, ...]) -> torch.Tensor:
    """``uniform`` of every stream at once, bit for bit: (len(streams), len(ids)) float32, in a
    fixed few dozen integer kernels instead of ~30 per stream (a step of RevCol-B asks for ~100)."""
    base = _mix(_constant(streams, torch.int64, ids.device) ^ _step_mix(seed, step))[:, None]  # per stream
    h = _mix((ids & _M32)[None, :] ^ base)
    h = _mix(h ^ ((ids >> 32) & _M32)[None, :] ^ _mix((base + 1) & _M32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


@dataclass
class SampleKeys:
    """Whose samples a forward computes: the run's seed, the optimizer step (a host int, or a
    0-d int64 tensor on the device), and each sample's global index (int64, on the compute
    device). ``streams``: those the forward will ask for (``models.layers.random_streams``),
    drawn together at the first ask."""
    seed: int
    step: Step
    ids: torch.Tensor
    streams: Tuple[int, ...] = ()
    keeps: Tuple[float, ...] = ()  # drop path's keep probability per declared stream, if known
    _cache: Dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _masks: Dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _draws: Optional[torch.Tensor] = field(default=None, repr=False)  # the declared streams' draws, a row each

    def uniform(self, stream: int) -> torch.Tensor:
        """Cached per stream: a recomputation reuses the forward's draw."""
        if stream not in self._cache:
            if stream in self.streams:
                self._draws = uniform_streams(self.seed, self.step, self.ids, self.streams)
                self._cache.update(zip(self.streams, self._draws))
            else:
                self._cache[stream] = uniform(self.seed, self.step, self.ids, stream)
        return self._cache[stream]

    def scaled_mask(self, stream: int, keep: float, dtype: torch.dtype) -> torch.Tensor:
        """(uniform < keep) / keep per sample, drop path's mask; cached like the draw, so that a
        recomputation reuses the forward's (the same values, three kernels fewer per block)."""
        key = (stream, keep, dtype)
        if key not in self._masks:
            if self.keeps and stream in self.streams and self.keeps[self.streams.index(stream)] == keep:
                self._declared_masks(dtype)
            else:
                self._masks[key] = (self.uniform(stream) < keep).to(dtype).div_(keep)
        return self._masks[key]

    def _declared_masks(self, dtype: torch.dtype) -> None:
        """The masks of every declared stream at once (four kernels, not three per block),
        bitwise those made one at a time: compared and divided in fp32, as a scalar keep is."""
        self.uniform(self.streams[0])  # draws every declared stream (rows of self._draws)
        keeps = _constant(self.keeps, torch.float32, self._draws.device)[:, None]
        masks = (self._draws < keeps).to(torch.float32).div_(keeps).to(dtype)
        self._masks.update(((s, k, dtype), m) for s, k, m in zip(self.streams, self.keeps, masks))

    def forget(self) -> None:
        """Drop the cached draws and masks (the next ask draws again)."""
        self._cache.clear()
        self._masks.clear()
        self._draws = None

    def split(self, parts: int):
        """The keys of ``tensor_split(parts)`` micro-batches."""
        return [SampleKeys(self.seed, self.step, ids, self.streams, self.keeps) for ids in self.ids.tensor_split(parts)]


_CURRENT: Optional[SampleKeys] = None  # a plain global: autograd runs CUDA backward on its own thread


def current() -> Optional[SampleKeys]:
    return _CURRENT


def set_current(keys: Optional[SampleKeys]) -> None:
    """For replay (a reversible recomputation puts back the keys its forward saw)."""
    global _CURRENT
    _CURRENT = keys


@contextlib.contextmanager
def keyed(keys: Optional[SampleKeys]):
    """Draws inside the block are keyed by ``keys`` (None: torch's generator)."""
    global _CURRENT
    saved, _CURRENT = _CURRENT, keys
    try:
        yield
    finally:
        _CURRENT = saved
