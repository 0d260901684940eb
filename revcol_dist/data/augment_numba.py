"""RandAugment (rand-m9-mstd0.5-inc1), normalisation and random erasing as numba kernels on
one HWC uint8 image, for FFCV's compiled pipeline (``ffcv_ops``): they run in FFCV's worker
threads, not on the training thread.

Each op computes exactly what ``transforms._apply_op`` computes on a CHW tensor (the same
float32 blends, integer-exact blur, float64 sampling coordinates), so the two paths agree
pixel for pixel; the tests hold them to it. Kernels walk the flat pixel array: nested
per-channel loops over 3-D views were 5-20x slower, and stepped ranges (range(0, n, 3)) 3x."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import draws


def _drop_stale_cache() -> None:
    """numba invalidates a cached kernel when its own file changes, not when a function it
    calls (draws.py) does: the kernels would keep old draws while numpy and torch use new
    ones. A stamp of both sources clears the cache of either when one changes."""
    import hashlib
    from pathlib import Path

    here = Path(__file__).resolve()
    cache = here.parent / "__pycache__"
    digest = hashlib.sha256(here.read_bytes() + Path(draws.__file__).read_bytes()).hexdigest()
    stamp = cache / "augment_numba.sources"
    try:
        if stamp.is_file() and stamp.read_text() == digest:
            return
        for f in [*cache.glob("augment_numba.*.nb[ic]"), *cache.glob("draws.*.nb[ic]")]:
            f.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:  # a read-only install: numba caches elsewhere or not at all
        pass


_drop_stale_cache()
_, chain_key, unit, randaug_slot, erase_box = draws.build(njit(nogil=True, cache=True))

F0, F255 = np.float32(0.0), np.float32(255.0)
R, G, B = np.float32(0.299), np.float32(0.587), np.float32(0.114)
FILL = np.array([124, 116, 104], dtype=np.uint8)
DEG = math.pi / 180.0
NUM_OPS = 15  # transforms.RAND_INCREASING_OPS, in that order
KEY_RANDAUG, KEY_ERASE = np.uint64(draws.RANDAUG), np.uint64(draws.ERASE)


@njit(nogil=True, cache=True)
def _to_u8(x):
    """float -> uint8 as torch's clamp(0, 255).to(uint8): truncating first and clamping the
    integer gives the same byte, without float compares' branches."""
    return np.uint8(min(max(np.int32(x), 0), 255))


@njit(nogil=True, cache=True)
def _apply_lut(src, dst, lut):
    s, d = src.reshape(-1), dst.reshape(-1)
    l0, l1, l2 = lut[0], lut[1], lut[2]
    for p in range(s.size // 3):
        i = 3 * p
        d[i] = l0[s[i]]
        d[i + 1] = l1[s[i + 1]]
        d[i + 2] = l2[s[i + 2]]


@njit(nogil=True, cache=True)
def _histogram(src):
    s = src.reshape(-1)
    hist = np.zeros((3, 256), dtype=np.int64)
    h0, h1, h2 = hist[0], hist[1], hist[2]
    for p in range(s.size // 3):
        i = 3 * p
        h0[s[i]] += 1
        h1[s[i + 1]] += 1
        h2[s[i + 2]] += 1
    return hist


@njit(nogil=True, cache=True)
def _autocontrast_lut(src):
    hist = _histogram(src)
    lut = np.empty((3, 256), dtype=np.uint8)
    for c in range(3):
        lo, hi = 0, 255
        while lo < 255 and hist[c, lo] == 0:
            lo += 1
        while hi > 0 and hist[c, hi] == 0:
            hi -= 1
        for v in range(256):  # the exact floor of (v - lo) * 255 / (hi - lo), clipped
            if hi > lo:
                lut[c, v] = min(max((v - lo) * 255 // (hi - lo), 0), 255)
            else:
                lut[c, v] = v
    return lut


@njit(nogil=True, cache=True)
def _equalize_lut(src):
    hist = _histogram(src)
    lut = np.empty((3, 256), dtype=np.uint8)
    for c in range(3):
        total, last = 0, 0
        for v in range(256):
            total += hist[c, v]
            if hist[c, v] > 0:
                last = hist[c, v]
        step = (total - last) // 255
        if step == 0:
            for v in range(256):
                lut[c, v] = v
            continue
        acc = 0
        lut[c, 0] = 0
        for v in range(255):
            acc += hist[c, v]
            lut[c, v + 1] = min((acc + step // 2) // step, 255)
    return lut


@njit(nogil=True, cache=True)
def _point_lut(op, m, factor, mean):
    """LUT of the ops whose output pixel depends on its own value only."""
    lut = np.empty((3, 256), dtype=np.uint8)
    f = np.float32(factor)
    bits = max(1, 4 - int(4 * m))
    mask = (0xFF << (8 - bits)) & 0xFF
    thresh = 256 - int(256 * m)
    add = int(110 * m)
    for v in range(256):
        if op == 2:  # Invert
            o = 255 - v
        elif op == 4:  # PosterizeIncreasing
            o = v & mask
        elif op == 5:  # SolarizeIncreasing
            o = 255 - v if v >= thresh else v
        elif op == 6:  # SolarizeAdd
            o = min(v + add, 255) if v < 128 else v
        elif op == 8:  # ContrastIncreasing: blend with the grey mean
            o = _to_u8(mean + f * (np.float32(v) - mean))
        else:  # 9, BrightnessIncreasing: blend with black
            o = _to_u8(f * np.float32(v))
        lut[0, v] = lut[1, v] = lut[2, v] = o
    return lut


@njit(nogil=True, cache=True)
def _gray_mean(src):
    s = src.reshape(-1)
    total = 0.0
    for p in range(s.size // 3):
        i = 3 * p
        total += (R * np.float32(s[i]) + G * np.float32(s[i + 1])) + B * np.float32(s[i + 2])
    return np.float32(total / (s.size // 3))


@njit(nogil=True, cache=True)
def _color(src, dst, factor):
    f = np.float32(factor)
    s, d = src.reshape(-1), dst.reshape(-1)
    for p in range(s.size // 3):
        i = 3 * p
        r, g, b = np.float32(s[i]), np.float32(s[i + 1]), np.float32(s[i + 2])
        gray = (R * r + G * g) + B * b
        d[i] = _to_u8(gray + f * (r - gray))
        d[i + 1] = _to_u8(gray + f * (g - gray))
        d[i + 2] = _to_u8(gray + f * (b - gray))


@njit(nogil=True, cache=True)
def _sharpness(src, dst, factor):
    """Blend with the 3x3 smoothing (centre 5, the rest 1, /13) of the interior; the border
    stays. The smoothing's sum is an integer, so it is exact in any summation order. Simple
    loops over one row's views (no negative offsets) so that LLVM vectorises them."""
    h, w, _ = src.shape
    f, thirteen = np.float32(factor), np.float32(13.0)
    s, d = src.reshape(-1), dst.reshape(-1)
    row = 3 * w
    d[:] = s
    col = np.empty(row, dtype=np.int32)
    mixed = np.empty(row, dtype=np.int32)
    for y in range(1, h - 1):
        up, mid, dn = s[(y - 1) * row : y * row], s[y * row : (y + 1) * row], s[(y + 1) * row : (y + 2) * row]
        out = d[y * row + 3 : (y + 1) * row - 3]
        for q in range(row):  # vertical 3-sums (the box is separable)
            col[q] = np.int32(up[q]) + np.int32(mid[q]) + np.int32(dn[q])
        for q in range(row - 6):
            v = np.int32(mid[q + 3])
            blur = np.float32(col[q] + col[q + 3] + col[q + 6] + 4 * v) / thirteen
            mixed[q] = np.int32(blur + f * (np.float32(v) - blur))
        for q in range(row - 6):
            out[q] = np.uint8(min(max(mixed[q], 0), 255))


@njit(nogil=True, cache=True)
def _affine(src, dst, t0, t1, t2, t3, t4, t5):
    """Output pixel -> input pixel by a 2x3 map in normalised coordinates (about the centre,
    pixel centres at (2j + 1) / W - 1), nearest (ties to even), outside filled grey. The order
    of operations is ``transforms._affine``'s, so both round alike."""
    h, w, _ = src.shape
    s, d = src.reshape(-1), dst.reshape(-1)
    xn = np.empty(w)
    for j in range(w):
        xn[j] = (2.0 * j + 1.0) / w - 1.0
    for i in range(h):
        yn = (2.0 * i + 1.0) / h - 1.0
        cx, cy = t1 * yn + t2, t4 * yn + t5
        for j in range(w):
            x0 = np.rint(((t0 * xn[j] + cx + 1.0) * w - 1.0) * 0.5)
            y0 = np.rint(((t3 * xn[j] + cy + 1.0) * h - 1.0) * 0.5)
            o = 3 * (i * w + j)
            if 0 <= x0 < w and 0 <= y0 < h:
                p = 3 * (int(y0) * w + int(x0))
                d[o], d[o + 1], d[o + 2] = s[p], s[p + 1], s[p + 2]
            else:
                d[o], d[o + 1], d[o + 2] = FILL[0], FILL[1], FILL[2]


@njit(nogil=True, cache=True)
def apply_op(op, m, neg, src, dst):
    """RAND_INCREASING_OPS[op] at magnitude m in [0, 1] (negated where the op is signed),
    src -> dst (HWC uint8, C-contiguous, distinct)."""
    sign = -1.0 if neg else 1.0
    factor = 1.0 + sign * (0.9 * m)
    if op == 0:
        _apply_lut(src, dst, _autocontrast_lut(src))
    elif op == 1:
        _apply_lut(src, dst, _equalize_lut(src))
    elif op == 3:
        a = sign * (30.0 * m) * DEG
        _affine(src, dst, math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0)
    elif op == 7:
        _color(src, dst, factor)
    elif op == 8:
        _apply_lut(src, dst, _point_lut(op, m, factor, _gray_mean(src)))
    elif op == 10:
        _sharpness(src, dst, factor)
    elif op == 11:
        _affine(src, dst, 1.0, sign * (0.3 * m), 0.0, 0.0, 1.0, 0.0)
    elif op == 12:
        _affine(src, dst, 1.0, 0.0, 0.0, sign * (0.3 * m), 1.0, 0.0)
    elif op == 13:
        _affine(src, dst, 1.0, 0.0, sign * (0.45 * m) * 2.0, 0.0, 1.0, 0.0)
    elif op == 14:
        _affine(src, dst, 1.0, 0.0, 0.0, 0.0, 1.0, sign * (0.45 * m) * 2.0)
    else:  # 2, 4, 5, 6, 9
        _apply_lut(src, dst, _point_lut(op, m, factor, F0))


@njit(nogil=True, cache=True)
def randaugment(img, scratch, seed, epoch, index, n_layers, magnitude, std, prob):
    """The sample's RandAugment, in place on img (scratch: an image-sized buffer)."""
    key = chain_key(np.uint64(seed), np.uint64(epoch), np.uint64(index), KEY_RANDAUG)
    done = 0
    for j in range(n_layers):
        op, applied, m, neg = randaug_slot(key, j, NUM_OPS, magnitude, std, prob)
        if applied:
            if done % 2 == 0:
                apply_op(op, m, neg, img, scratch)
            else:
                apply_op(op, m, neg, scratch, img)
            done += 1
    if done % 2 == 1:
        img[:] = scratch


@njit(nogil=True, cache=True)
def normalize_erase(src, out, lut, bank, seed, epoch, index, prob):
    """HWC uint8 -> CHW float32 through lut [3, 256] ((v - mean) / std), then the sample's
    erasing box (if drawn) filled from the noise bank."""
    h, w, _ = src.shape
    s = src.reshape(-1)
    for i in range(h):
        for j in range(w):
            p = 3 * (i * w + j)
            out[0, i, j] = lut[0, s[p]]
            out[1, i, j] = lut[1, s[p + 1]]
            out[2, i, j] = lut[2, s[p + 2]]
    if prob <= 0.0:
        return
    key = chain_key(np.uint64(seed), np.uint64(epoch), np.uint64(index), KEY_ERASE)
    erased, top, left, eh, ew, off = erase_box(key, h, w, bank.size, prob)
    if erased:
        for c in range(3):
            for y in range(eh):
                q = off + (c * eh + y) * ew
                for x in range(ew):
                    out[c, top + y, left + x] = bank[q + x]


# Batch entry points: compiled once (and cached on disk), parallel over the batch's images.
# FFCV calls them from its worker thread as uncompiled operations; compiling them into FFCV's
# own pipeline instead cost 13-18 s at every stream start (numba re-optimises linked callees).

@njit(nogil=True, cache=True, parallel=True)
def randaugment_batch(images, scratch, indices, seed, epoch, n_layers, magnitude, std, prob):
    for k in prange(images.shape[0]):
        randaugment(images[k], scratch[k], seed, epoch, np.uint64(indices[k]), n_layers, magnitude, std, prob)


@njit(nogil=True, cache=True, parallel=True)
def normalize_erase_batch(images, out, lut, bank, indices, seed, epoch, prob):
    for k in prange(images.shape[0]):
        normalize_erase(images[k], out[k], lut, bank, seed, epoch, np.uint64(indices[k]), prob)
