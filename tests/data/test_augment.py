"""The recipe's augmentation on its three executors: the numba kernels FFCV runs in its
worker threads, the tensor ops the fallback runs in its workers, and the batched device
form of erasing; each against the others and against an independent computation."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from revcol_dist.data import draws
from revcol_dist.data.transforms import RAND_INCREASING_OPS, RandAugment, _apply_op, erase_batch, erase_image, normalize

numba = pytest.importorskip("numba")
K = pytest.importorskip("revcol_dist.data.augment_numba")

MAGNITUDES = ((0.9, False), (0.83, True), (0.0, False), (1.0, True), (0.47, True))


def photos():
    skd = pytest.importorskip("skimage.data")
    out = []
    for name, size in (("astronaut", (96, 96)), ("coffee", (88, 72)), ("chelsea", (64, 80))):
        arr = np.asarray(Image.fromarray(getattr(skd, name)()).resize(size, Image.BICUBIC))
        out.append(np.ascontiguousarray(arr[..., :3]))
    return out



@pytest.fixture(scope="module")
def imgs():
    return photos()


def tensor_op(name, hwc, m, neg):
    chw = torch.from_numpy(hwc.copy()).permute(2, 0, 1).contiguous()
    return _apply_op(name, chw, m, neg).permute(1, 2, 0).numpy()


def kernel_op(op, hwc, m, neg):
    dst = np.empty_like(hwc)
    K.apply_op(op, m, neg, np.ascontiguousarray(hwc), dst)
    return dst


@pytest.mark.parametrize("op", range(len(RAND_INCREASING_OPS)), ids=RAND_INCREASING_OPS)
def test_kernel_equals_tensor_op_pixel_for_pixel(imgs, op):
    """FFCV's compiled op and the fallback's tensor op compute the same bytes (square and
    non-square images, every magnitude's edge, both signs)."""
    for img in imgs:
        for m, neg in MAGNITUDES:
            a, b = kernel_op(op, img, m, neg), tensor_op(RAND_INCREASING_OPS[op], img, m, neg)
            assert np.array_equal(a, b), (RAND_INCREASING_OPS[op], m, neg, np.abs(a.astype(int) - b).max())


def pil(img):
    return Image.fromarray(img)


def close(a, b, tol, frac=1.0):
    d = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
    return d.max() <= tol and (d > 0).mean() <= frac, (d.max(), (d > 0).mean())


@pytest.mark.parametrize("m,neg", MAGNITUDES[:2] + MAGNITUDES[4:])
def test_point_ops_against_pil(imgs, m, neg):
    """Against PIL's ImageOps and ImageEnhance (what timm's RandAugment calls): the same
    bytes where PIL's arithmetic is exact, within its rounding where it works on rounded
    intermediates (its grey image and smoothing are uint8)."""
    f = 1.0 + (-1 if neg else 1) * 0.9 * m
    for img in imgs:
        ours = lambda name: kernel_op(RAND_INCREASING_OPS.index(name), img, m, neg)  # noqa: E731
        assert np.array_equal(ours("Invert"), np.asarray(ImageOps.invert(pil(img))))
        bits = max(1, 4 - int(4 * m))
        assert np.array_equal(ours("PosterizeIncreasing"), np.asarray(ImageOps.posterize(pil(img), bits)))
        assert np.array_equal(ours("SolarizeIncreasing"), np.asarray(ImageOps.solarize(pil(img), 256 - int(256 * m))))
        add = int(110 * m)
        expect = np.where(img < 128, np.minimum(img.astype(int) + add, 255), img)
        assert np.array_equal(ours("SolarizeAdd"), expect)
        assert np.array_equal(ours("Equalize"), np.asarray(ImageOps.equalize(pil(img))))
        ok, why = close(ours("AutoContrast"), np.asarray(ImageOps.autocontrast(pil(img))), 1, 0.02)
        assert ok, ("AutoContrast", why)
        ok, why = close(ours("BrightnessIncreasing"), np.asarray(ImageEnhance.Brightness(pil(img)).enhance(f)), 1)
        assert ok, ("Brightness", why)
        for name, enh in (("ColorIncreasing", ImageEnhance.Color), ("ContrastIncreasing", ImageEnhance.Contrast),
                          ("SharpnessIncreasing", ImageEnhance.Sharpness)):
            ok, why = close(ours(name), np.asarray(enh(pil(img)).enhance(f)), 2, 0.5)
            assert ok, (name, why)


def reference_affine(img, src_of):
    """Each output pixel takes the input pixel whose square holds the mapped centre of the
    output pixel; src_of maps centre offsets (u, v) from the image centre, in pixels."""
    h, w, _ = img.shape
    out = np.empty_like(img)
    fill = np.array([124, 116, 104], dtype=np.uint8)
    for i in range(h):
        for j in range(w):
            u, v = j + 0.5 - w / 2, i + 0.5 - h / 2
            su, sv = src_of(u, v)
            x, y = math.floor(su + w / 2), math.floor(sv + h / 2)
            out[i, j] = img[y, x] if 0 <= x < w and 0 <= y < h else fill
    return out


@pytest.mark.parametrize("m,neg", MAGNITUDES[:2])
def test_geometric_ops_against_pixel_space_maps(imgs, m, neg):
    """Rotation, shears and translations written in pixel space about the centre; outputs
    may differ only where a mapped centre falls on a pixel edge (rounding)."""
    img = imgs[0]  # square: the normalised map is a pixel-space rotation there
    s = -1 if neg else 1
    a = math.radians(s * 30 * m)
    h, w, _ = img.shape
    maps = {
        "Rotate": lambda u, v: (math.cos(a) * u - math.sin(a) * v, math.sin(a) * u + math.cos(a) * v),
        "ShearX": lambda u, v: (u + s * 0.3 * m * v, v),
        "ShearY": lambda u, v: (u, s * 0.3 * m * u + v),
        "TranslateXRel": lambda u, v: (u + s * 0.45 * m * w, v),
        "TranslateYRel": lambda u, v: (u, v + s * 0.45 * m * h),
    }
    for name, src_of in maps.items():
        ok, why = close(kernel_op(RAND_INCREASING_OPS.index(name), img, m, neg), reference_affine(img, src_of), 255, 0.01)
        assert ok, (name, why)


def test_draws_agree_on_numpy_torch_and_numba():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 2**40, 64)
    for seed, epoch, stream in ((0, 0, draws.RANDAUG), (2**40 + 3, 17, draws.ERASE)):
        u = draws.uniforms(seed, epoch, idx, stream, 8)
        kt = draws.sample_keys_t(seed, epoch, torch.from_numpy(idx.astype(np.int64)), stream)
        ut = draws.unit_t(kt[:, None], torch.arange(8)[None, :]).numpy()
        assert np.array_equal(u, ut)
        key = np.uint64(K.chain_key(np.uint64(seed), np.uint64(epoch), np.uint64(idx[5]), np.uint64(stream)))
        assert [K.unit(key, np.uint64(k)) for k in range(8)] == list(u[5])
        assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.05
    # another epoch, seed or index: other numbers
    assert not np.array_equal(draws.uniforms(0, 0, idx, 1, 4), draws.uniforms(0, 1, idx, 1, 4))
    assert not np.array_equal(draws.uniforms(0, 0, idx, 1, 4), draws.uniforms(1, 0, idx, 1, 4))


def test_randaugment_chain_kernel_equals_tensor_path(imgs):
    """The whole per-sample chain (op choice, probability, magnitude, sign from the sample's
    key): the FFCV path and the fallback agree on every sample."""
    ra = RandAugment()
    applied = 0
    for i in range(120):
        img = imgs[i % len(imgs)]
        key = draws.sample_key(7, 3, i, draws.RANDAUG)
        ours = img.copy()
        K.randaugment(ours, np.empty_like(ours), np.uint64(7), 3, np.uint64(i), 2, 9.0, 0.5, 0.5)
        ref = ra(torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous(), key).permute(1, 2, 0).numpy()
        assert np.array_equal(ours, ref), i
        applied += not np.array_equal(ours, img)
    assert 0.6 * 120 <= applied <= 0.9 * 120  # 1 - 0.5**2 = 75% get at least one op


def test_randaugment_plan_statistics():
    """rand-m9-mstd0.5-inc1: ops uniform over the 15, each applied with probability 0.5,
    magnitude N(9, 0.5) clipped to [0, 10], signs even."""
    ops, applied, mags, negs = [], [], [], []
    for i in range(6000):
        key = draws.sample_key(1, 0, i, draws.RANDAUG)
        for j in range(2):
            op, a, m, n = draws.randaug_slot(key, j, 15, 9.0, 0.5, 0.5)
            ops.append(op), applied.append(a), mags.append(m), negs.append(n)
    counts = np.bincount(ops, minlength=15)
    assert counts.min() > 0.85 * 800 and counts.max() < 1.15 * 800
    assert abs(np.mean(applied) - 0.5) < 0.02 and abs(np.mean(negs) - 0.5) < 0.02
    mags = np.array(mags) * 10
    assert abs(mags.mean() - 9.0) < 0.02 and abs(mags.std() - 0.5) < 0.02 and mags.max() <= 10.0


def test_erasing_statistics():
    """Probability 0.25; area 2%-33% of the image, aspect 0.3-3.3 (log-uniform), the box
    inside the image at a uniform position; the noise standard normal."""
    h = w = 224
    n_bank = draws.bank_size(3, h, w)
    boxes = [draws.erase_box(draws.sample_key(3, 1, i, draws.ERASE), h, w, n_bank, 0.25) for i in range(20000)]
    hit = np.array([b[0] for b in boxes])
    assert abs(hit.mean() - 0.25) < 0.015
    top, left, eh, ew, off = (np.array([b[k] for b in boxes if b[0]]) for k in range(1, 6))
    area = eh * ew / (h * w)
    assert area.min() >= 0.019 and area.max() <= 0.34 and abs(area.mean() - (0.02 + 1 / 3) / 2) < 0.01
    log_aspect = np.log(eh / ew)
    assert log_aspect.min() >= math.log(0.3) - 0.05 and log_aspect.max() <= -math.log(0.3) + 0.05
    assert abs(log_aspect.mean()) < 0.05
    assert (top + eh <= h).all() and (left + ew <= w).all() and (top >= 0).all() and (left >= 0).all()
    assert (off >= 0).all() and (off + 3 * eh * ew <= n_bank).all()
    centre = (top + eh / 2) / h
    assert abs(centre.mean() - 0.5) < 0.02
    bank = draws.noise_bank(3, n_bank)
    assert abs(bank.mean()) < 0.01 and abs(bank.std() - 1) < 0.01
    assert abs(np.mean(np.abs(bank) < 1.96) - 0.95) < 0.005  # normal, not uniform


def test_normalise_and_erase_agree_on_all_three_paths(imgs):
    """The worker kernel (FFCV), the per-image tensor form (fallback workers) and the batched
    device form (after a uint8 copy) give the same floats."""
    img = np.ascontiguousarray(np.asarray(Image.fromarray(imgs[0]).resize((64, 48))))
    batch = np.stack([img] * 40)
    idx = np.arange(1000, 1040, dtype=np.uint64)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    u8 = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
    bank = np.array(draws.noise_bank(5, draws.bank_size(3, 48, 64)))
    lut = normalize(torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256), mean, std).view(3, 256).numpy()
    worker = np.empty((40, 3, 48, 64), np.float32)
    K.normalize_erase_batch(batch, worker, np.ascontiguousarray(lut), bank, idx, np.uint64(5), 2, 0.5)
    device = erase_batch(normalize(u8, mean, std), torch.from_numpy(idx.astype(np.int64)), 5, 2, 0.5, torch.from_numpy(bank))
    per_image = torch.stack([erase_image(normalize(u8[k : k + 1], mean, std)[0], draws.sample_key(5, 2, int(idx[k]), draws.ERASE),
                                         0.5, torch.from_numpy(bank)) for k in range(40)])
    plain = normalize(u8, mean, std)
    assert torch.equal(torch.from_numpy(worker), device) and torch.equal(device, per_image)
    erased = (device != plain).flatten(1).any(1)
    assert 10 <= int(erased.sum()) <= 30  # about half of 40
