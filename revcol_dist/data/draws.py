"""Counter-based random draws for augmentation: draw k of a sample is a pure function of
(seed, epoch, sample index, stream, k), so any rank, batch, worker thread or resumed run
that handles the sample sees the same numbers, in any order.

One definition (splitmix64's finaliser over a chain of keys) serves three executors: numpy
arrays (the torch fallback's workers and the tests), numba (FFCV's compiled operations, which
compile the same functions) and torch int64 tensors on any device (erasing after the copy).
numpy's and numba's uint64 arithmetic wraps; torch has no uint64 multiply, so the torch form
works on int64 (same low 64 bits) with masked shifts."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

RANDAUG = 0x52414E44  # stream ids: which augmentation a draw belongs to
ERASE = 0x45524153

GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_UNIT = 1.0 / 9007199254740992.0  # 2**-53

# RandAugment: per op slot, 5 draws (op, apply, two for the magnitude's normal, sign)
DRAWS_PER_OP = 5
# erasing: draw 0 decides, then 10 tries of 4 (area, aspect, top, left), then the noise offset
ERASE_TRIES = 10
ERASE_OFFSET = 1 + 4 * ERASE_TRIES
NOISE = 0x4E4F4953  # the stream of the shared noise bank
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
TWO_PI = 2 * math.pi


def build(jit):
    """(mix, chain_key, unit) compiled by ``jit``: identity for numpy arrays, numba's njit for
    the compiled operations (one source, so both executors draw the same numbers)."""

    @jit
    def mix(z):
        """splitmix64's finaliser on np.uint64 (arrays, or scalars under numba)."""
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        return z ^ (z >> _S31)

    @jit
    def chain_key(seed, epoch, index, stream):
        k = mix(seed + GAMMA)
        k = mix((k ^ epoch) + GAMMA)
        k = mix((k ^ index) + GAMMA)
        return mix((k ^ stream) + GAMMA)

    @jit
    def unit(key, k):
        """Draw k of a key, uniform in [0, 1) with 53 bits."""
        return (mix(key + (k + np.uint64(1)) * GAMMA) >> _S11) * _UNIT

    @jit
    def randaug_slot(key, j, n_ops, magnitude, std, prob):
        """Op slot j of a sample: (op index, applied, magnitude in [0, 1], negated)."""
        b = np.uint64(DRAWS_PER_OP * j)
        op = min(int(unit(key, b) * n_ops), n_ops - 1)
        applied = unit(key, b + np.uint64(1)) < prob
        u1, u2 = unit(key, b + np.uint64(2)), unit(key, b + np.uint64(3))
        z = math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(TWO_PI * u2)
        m = min(max(magnitude + std * z, 0.0), 10.0) / 10.0
        return op, applied, m, unit(key, b + np.uint64(4)) < 0.5

    @jit
    def erase_box(key, h, w, area_n, prob):
        """(erased, top, left, height, width, noise offset) of a sample's erasing box, the
        first of 10 tries that fits; area_n: the noise bank's size."""
        if not unit(key, np.uint64(0)) < prob:
            return False, 0, 0, 0, 0, 0
        for t in range(ERASE_TRIES):
            b = np.uint64(1 + 4 * t)
            area = h * w * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * unit(key, b))
            aspect = math.exp(ERASE_LOG_ASPECT[0] + (ERASE_LOG_ASPECT[1] - ERASE_LOG_ASPECT[0]) * unit(key, b + np.uint64(1)))
            eh, ew = int(np.rint(math.sqrt(area * aspect))), int(np.rint(math.sqrt(area / aspect)))
            if eh < h and ew < w:
                top = int(unit(key, b + np.uint64(2)) * (h - eh + 1))
                left = int(unit(key, b + np.uint64(3)) * (w - ew + 1))
                off = int(unit(key, np.uint64(ERASE_OFFSET)) * (area_n - 3 * eh * ew + 1))
                return True, top, left, eh, ew, off
        return False, 0, 0, 0, 0, 0

    return mix, chain_key, unit, randaug_slot, erase_box


mix, chain_key, unit, _randaug_slot, _erase_box = build(lambda f: f)


def sample_key(seed: int, epoch: int, index: int, stream: int) -> np.uint64:
    with np.errstate(over="ignore"):
        return chain_key(np.uint64(seed % 2**64), np.uint64(epoch), np.uint64(index), np.uint64(stream))


def randaug_slot(key, j: int, n_ops: int, magnitude: float, std: float, prob: float):
    with np.errstate(over="ignore"):
        op, applied, m, neg = _randaug_slot(key, j, n_ops, magnitude, std, prob)
    return int(op), bool(applied), float(m), bool(neg)


def erase_box(key, h: int, w: int, area_n: int, prob: float):
    with np.errstate(over="ignore"):
        out = _erase_box(key, h, w, area_n, prob)
    return (bool(out[0]),) + tuple(int(v) for v in out[1:])


def sample_keys(seed: int, epoch: int, indices, stream: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.uint64).reshape(-1)
    u = np.uint64
    return chain_key(np.full_like(idx, u(seed % 2**64)), np.full_like(idx, u(epoch)), idx, np.full_like(idx, u(stream)))


def uniforms(seed: int, epoch: int, indices, stream: int, n: int, start: int = 0) -> np.ndarray:
    """[len(indices), n] float64: draws start..start+n-1 of each sample."""
    keys = sample_keys(seed, epoch, indices, stream)[:, None]
    ks = np.arange(start, start + n, dtype=np.uint64)[None, :]
    return unit(keys, ks)


def normal_pair(u1, u2):
    """Box-Muller: two standard normals from two uniforms (1 - u1 is in (0, 1])."""
    r = np.sqrt(-2.0 * np.log(1.0 - u1))
    return r * np.cos(TWO_PI * u2), r * np.sin(TWO_PI * u2)


def bank_size(channels: int, h: int, w: int) -> int:
    """Noise values an erasing box draws from: 4x an image, so boxes start at many offsets."""
    return 4 * channels * h * w


@functools.lru_cache(maxsize=4)
def noise_bank(seed: int, n: int) -> np.ndarray:
    """n standard normals (float32), a function of the seed only. Erasing fills a box with a
    window of it that starts at a drawn offset: cheap for compiled code and for the device
    alike, and the same values on every path."""
    pairs = (n + 1) // 2
    u = uniforms(seed, 0, [0], NOISE, 2 * pairs)[0]
    z0, z1 = normal_pair(u[0::2], u[1::2])
    out = np.empty(2 * pairs, dtype=np.float32)
    out[0::2], out[1::2] = z0, z1
    out.setflags(write=False)
    return out[:n]


# ------------------------------------------------------------------------ torch (any device)

def _signed(c: np.uint64) -> int:
    c = int(c)
    return c - 2**64 if c >= 2**63 else c


_T_GAMMA, _T_M1, _T_M2 = _signed(GAMMA), _signed(_M1), _signed(_M2)


def _lshr(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix_t(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _lshr(z, 30)) * _T_M1
    z = (z ^ _lshr(z, 27)) * _T_M2
    return z ^ _lshr(z, 31)


def _const(v: int) -> int:
    return _signed(np.uint64(v % 2**64))


def sample_keys_t(seed: int, epoch: int, index: torch.Tensor, stream: int) -> torch.Tensor:
    """Keys of int64 sample indices, on their device (no host round trip)."""
    k = mix_t(torch.full_like(index, _const(seed)) + _T_GAMMA)
    k = mix_t((k ^ _const(epoch)) + _T_GAMMA)
    k = mix_t((k ^ index) + _T_GAMMA)
    return mix_t((k ^ _const(stream)) + _T_GAMMA)


def unit_t(key: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """float64 draws k (int64, broadcast against key)."""
    return _lshr(mix_t(key + (k + 1) * _T_GAMMA), 11).double() * _UNIT
