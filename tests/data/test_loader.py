import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from revcol_dist.data.ffcv_support import ffcv_available
from revcol_dist.data.folder import DataError, scan_image_folder
from revcol_dist.data.loader import build_loader
from revcol_dist.data.order import ShardedOrder

needs_ffcv = pytest.mark.skipif(not ffcv_available(), reason="the ffcv extra is not installed")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readable(src) -> list:
    """Indices a loader over ``src`` can yield: the .beton holds only readable images; an
    ImageFolder's corrupt file keeps its position but is skipped."""
    if str(src).endswith(".beton"):
        return list(range(21))
    return [i for i, (p, _) in enumerate(scan_image_folder(src).samples) if not p.endswith("broken.jpg")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 7 images of different sizes, plus one corrupt file."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir()
        for i in range(7):
            h, w = 48, 56  # one size, so that the round trip can read raw pixels back
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    (root / "class1" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


@pytest.fixture(scope="module")
def beton(folder, tmp_path_factory):
    if not ffcv_available():
        pytest.skip("the ffcv extra is not installed")
    out = tmp_path_factory.mktemp("beton") / "data.beton"
    r = subprocess.run([sys.executable, "-m", "revcol_dist.data.write", "--src", str(folder), "--out", str(out),
                        "--mode", "raw", "--max-res", "0", "--workers", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote 21 images in 3 classes" in r.stdout and "skipped 1 unreadable" in r.stdout
    return out


@needs_ffcv
def test_round_trip_every_image_and_label(folder, beton):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    with open(str(beton) + ".json") as f:
        meta = json.load(f)
    assert len(meta["skipped"]) == 1 and meta["skipped"][0]["path"].endswith("broken.jpg")
    files = meta["files"]
    # read every sample back one by one, raw, and compare with the source file
    loader = Loader(str(beton), batch_size=1, order=OrderOption.SEQUENTIAL, num_workers=1,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()], "index": [IntDecoder()]})
    seen = 0
    for (img, label, index), path in zip(loader, files):
        expect = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(img[0], expect), path
        assert int(np.ravel(label)[0]) == int(os.path.basename(os.path.dirname(path))[-1])
        assert int(np.ravel(index)[0]) == seen
        seen += 1
    assert seen == 21


@pytest.mark.parametrize("backend", ["ffcv", "torch"])
def test_two_ranks_disjoint_and_complete(folder, beton, backend):
    """Each sample once per epoch across ranks (eval), and equal disjoint shards (train)."""
    src = beton if backend == "ffcv" else folder
    seen = []
    for rank in range(2):
        s = build_loader(src, train=False, batch_size=4, img_size=32, rank=rank, world_size=2, backend=backend)
        seen.append([int(i) for _, _, idx in s for i in idx])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == readable(src)
    tr = [[int(i) for _, _, idx in build_loader(src, train=True, batch_size=4, img_size=32, rank=r, world_size=2,
                                                  backend=backend) for i in idx] for r in range(2)]
    per_rank = len(readable(src)) // 2 // 4 * 4 if backend == "ffcv" else 8
    assert len(tr[0]) + len(tr[1]) <= 2 * per_rank and not set(tr[0]) & set(tr[1])


@pytest.mark.multiprocess
def test_sharding_in_real_processes(folder, tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(
        "import os, sys, torch.distributed as dist\n"
        "from revcol_dist.data.loader import build_loader\n"
        "dist.init_process_group('gloo')\n"
        "r, w = dist.get_rank(), dist.get_world_size()\n"
        f"s = build_loader(r'{folder}', train=False, batch_size=3, img_size=32, distributed=True, backend='torch')\n"
        "mine = [int(i) for _, _, idx in s for i in idx]\n"
        "allv = [None] * w\n"
        "dist.all_gather_object(allv, mine)\n"
        f"ok = sorted(sum(allv, [])) == {readable(folder)!r}\n"
        "if r == 0:\n"
        "    print('SEEN', ok, len(set(allv[0]) & set(allv[1])), [len(v) for v in allv], flush=True)\n"
        "dist.barrier()\n"
        "dist.destroy_process_group()\n"
    )
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                        str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("SEEN")]
    assert len(lines) == 1 and lines[0].startswith("SEEN True 0 ")
    sizes = json.loads(lines[0].split(" ", 3)[3])
    assert sum(sizes) == 21 and min(sizes) >= 10


@pytest.mark.parametrize("backend", ["ffcv", "torch"])
def test_deterministic_order_per_seed_and_epoch(folder, beton, backend):
    src = beton if backend == "ffcv" else folder

    def epochs(seed, n=2):
        s = build_loader(src, train=True, batch_size=4, img_size=32, seed=seed, backend=backend)
        return [[int(i) for _, _, idx in s for i in idx] for _ in range(n)]

    a, b, c = epochs(1), epochs(1), epochs(2)
    assert a == b
    assert a[0] != a[1]  # a new order every epoch
    assert a != c


@pytest.mark.parametrize("backend", ["ffcv", "torch"])
def test_augmented_pixels_reproducible_and_varying(folder, beton, backend):
    """The same seed gives the same crops and flips (FFCV's own decoders draw unseeded), and a
    sample is cropped differently in another epoch."""
    src = beton if backend == "ffcv" else folder

    def run(seed):
        s = build_loader(src, train=True, batch_size=4, img_size=32, seed=seed, backend=backend, hflip=True)
        out = []
        for _ in range(2):
            out.append({int(i): img.clone() for imgs, _, idx in s for i, img in zip(idx, imgs)})
        return out

    a, b = run(5), run(5)
    for ea, eb in zip(a, b):
        assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    common = sorted(a[0].keys() & a[1].keys())
    changed = sum(not torch.equal(a[0][k], a[1][k]) for k in common)
    assert changed >= 0.8 * len(common)  # new crops every epoch


@pytest.mark.parametrize("backend", ["ffcv", "torch"])
def test_resume_mid_epoch(folder, beton, backend):
    src = beton if backend == "ffcv" else folder
    kw = dict(train=True, batch_size=2, img_size=32, seed=3, backend=backend)
    full = build_loader(src, **kw)
    ref = [[int(i) for i in idx] for _, _, idx in full] + [[int(i) for i in idx] for _, _, idx in full]
    first = build_loader(src, **kw)
    got = []
    for k, (_, _, idx) in enumerate(first):
        got.append([int(i) for i in idx])
        if k == 3:
            break
    state = first.state_dict()
    assert state["batches_done"] == 4
    resumed = build_loader(src, **kw)
    resumed.load_state_dict(state)
    got += [[int(i) for i in idx] for _, _, idx in resumed] + [[int(i) for i in idx] for _, _, idx in resumed]
    assert got == ref


def test_fallback_warns_once_in_one_line(folder, monkeypatch):
    monkeypatch.setenv("REVCOL_DISABLE_FFCV", "1")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s = build_loader(folder, train=True, batch_size=4, img_size=32)
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "pip install" in msgs[0]
    x, y, idx = next(iter(s))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32


def test_corrupt_image_is_skipped_and_counted(folder):
    s = build_loader(folder, train=False, batch_size=8, img_size=32, backend="torch")
    n = sum(len(y) for _, y, _ in s)
    assert n == 21 and s.skipped == 1


def test_bad_folders_are_explained(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_image_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="no class sub-folders"):
        scan_image_folder(tmp_path)
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        scan_image_folder(tmp_path)


@needs_ffcv
def test_beton_with_another_layout_is_explained(tmp_path):
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    class Ints:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return (i,)

    path = tmp_path / "other.beton"
    DatasetWriter(str(path), {"label": IntField()}, num_workers=1).from_indexed_dataset(Ints())
    (tmp_path / "other.beton.json").write_text(json.dumps({"classes": ["a"], "num_samples": 4, "files": [], "source": "/"}))
    with pytest.raises(DataError, match=r"has fields \{'label': 'IntField'\}, expected"):
        build_loader(path, train=True, batch_size=2, img_size=32)


def test_order_state_checks_compatibility():
    o = ShardedOrder(100, 10, 0, 2, seed=1)
    with pytest.raises(ValueError, match="world_size=4"):
        o.load_state_dict({**o.state_dict(), "world_size": 4})


def test_randaugment_and_erasing_change_images_deterministically(folder):
    kw = dict(train=True, batch_size=4, img_size=32, seed=5, backend="torch")
    plain = next(iter(build_loader(folder, **kw)))[0]
    aug1 = next(iter(build_loader(folder, randaug=True, erasing=1.0, **kw)))[0]
    aug2 = next(iter(build_loader(folder, randaug=True, erasing=1.0, **kw)))[0]
    assert torch.equal(aug1, aug2)
    assert not torch.equal(plain, aug1)


@pytest.mark.parametrize("backend", ["ffcv", "torch"])
def test_recipe_augmentation_is_the_same_at_any_world_size_and_after_resume(folder, beton, backend):
    """Crop, flip, RandAugment and erasing of a sample are a function of (seed, epoch, its index):
    two ranks' halves of each global batch, and a run resumed mid-epoch, give one process's pixels."""
    src = beton if backend == "ffcv" else folder
    kw = dict(train=True, img_size=32, seed=11, backend=backend, hflip=True, randaug=True, erasing=0.5)

    def pixels(stream, batches=None):
        out = {}
        for k, (imgs, _, idx) in enumerate(stream):
            out.update({int(i): img.clone() for i, img in zip(idx, imgs)})
            if batches is not None and k + 1 == batches:
                break
        return out

    one = pixels(build_loader(src, batch_size=4, **kw))
    two = {}
    for rank in range(2):
        two.update(pixels(build_loader(src, batch_size=2, rank=rank, world_size=2, **kw)))
    assert one.keys() == two.keys() and len(one) >= 8
    assert all(torch.equal(one[k], two[k]) for k in one)
    first = build_loader(src, batch_size=4, **kw)
    seen = pixels(first, batches=2)
    resumed = build_loader(src, batch_size=4, **kw)
    resumed.load_state_dict(first.state_dict())
    seen.update(pixels(resumed))
    assert seen.keys() == one.keys() and all(torch.equal(one[k], seen[k]) for k in one)


def test_writer_draws_no_bar_when_asked(tmp_path, capfd):
    """prepare_digits writes its .beton files with progress=False: FFCV's own tqdm bar stays off."""
    from revcol_dist.data.digits import prepare_digits

    prepare_digits(tmp_path / "digits")
    captured = capfd.readouterr()
    assert "it/s" not in captured.err + captured.out and "%|" not in captured.err


def test_data_position_carries_over_layouts_and_maps_a_new_batch_only_when_asked():
    from revcol_dist.data.order import ShardedOrder

    two = ShardedOrder(num_samples=100, batch_size=4, rank=1, world_size=2, seed=3)
    two.advance(5)  # 5 global batches of 8 into epoch 0
    pos = two.global_position()
    one = ShardedOrder(num_samples=100, batch_size=8, seed=3)
    one.load_global_position(pos)  # same global batch on one rank: the same next samples
    mine = [i for r in range(2) for i in ShardedOrder(100, 4, r, 2, 3, batches_done=5).remaining_indices()[:4]]
    assert sorted(one.remaining_indices()[:8]) == sorted(mine)
    bigger = ShardedOrder(num_samples=100, batch_size=16, seed=3)
    with pytest.raises(ValueError, match="train.allow_batch_change=true"):
        bigger.load_global_position(pos)
    bigger.load_global_position(pos, allow_batch_change=True)
    assert (bigger.epoch, bigger.batches_done) == (0, 2)  # 40 samples in: the boundary at 32
    with pytest.raises(ValueError, match="seed"):
        ShardedOrder(num_samples=100, batch_size=8, seed=4).load_global_position(pos)


@pytest.mark.parametrize("backend", ["ffcv", "torch"])
def test_recipe_finished_in_workers_equals_finished_on_the_device(folder, beton, backend):
    """Normalisation and erasing in the workers (float32 batches) or batched after the uint8
    batch crossed to the device (here the CPU stands in for it): the same floats; and the
    device form hands over uint8 from the workers (4x fewer bytes to copy)."""
    src = beton if backend == "ffcv" else folder
    kw = dict(train=True, batch_size=4, img_size=32, seed=9, backend=backend, randaug=True, erasing=0.5)
    workers = build_loader(src, finish="workers", **kw)
    device = build_loader(src, finish="device", **kw)
    raw = next(iter(device._batches(device.order.remaining_indices())))[0]
    assert raw.dtype == torch.uint8
    n = 0
    for _ in range(2):  # two epochs: the epoch reaches the compiled operations without a recompile
        for (a, ya, ia), (b, yb, ib) in zip(workers, device):
            assert a.dtype == b.dtype == torch.float32 and torch.equal(ia, ib) and torch.equal(ya, yb)
            assert torch.equal(a, b)
            n += len(ia)
    assert n >= 16
    with pytest.raises(ValueError, match="finish must be one of"):
        build_loader(src, finish="gpu", **kw)


@pytest.mark.parametrize("backend", ["ffcv", "torch"])
def test_recipe_pixels_are_a_function_of_seed_and_epoch(folder, beton, backend):
    """With RandAugment and erasing on: a second run with the same seed gives the same pixels
    in each epoch; the next epoch, or another seed, augments the same sample differently."""
    src = beton if backend == "ffcv" else folder
    kw = dict(train=True, batch_size=4, img_size=32, backend=backend, randaug=True, erasing=0.5)

    def run(seed):
        s = build_loader(src, seed=seed, **kw)
        return [{int(i): x.clone() for xs, _, idx in s for i, x in zip(idx, xs)} for _ in range(2)]

    a, b, c = run(4), run(4), run(5)
    for ea, eb in zip(a, b):
        assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    for other in (a[1], c[0]):
        common = sorted(a[0].keys() & other.keys())
        assert len(common) >= 4 and sum(not torch.equal(a[0][k], other[k]) for k in common) >= 0.8 * len(common)


@needs_ffcv
def test_stopping_mid_epoch_ends_ffcvs_thread(beton):
    """A consumer that stops early (max_steps mid-epoch, a resume test) must not leave FFCV's
    worker thread running on, holding its buffers and launching kernels beside the next epoch."""
    import gc
    import threading

    gc.collect()
    before = set(threading.enumerate())
    s = build_loader(beton, train=True, batch_size=2, img_size=32, seed=1, backend="ffcv", randaug=True, erasing=0.5)
    started = []
    for k, _ in enumerate(s):
        started = [t for t in threading.enumerate() if type(t).__name__ == "EpochIterator" and t not in before]
        if k == 1:
            break
    gc.collect()
    assert len(started) == 1 and not started[0].is_alive()
    assert len(list(s)) > 0  # and the stream goes on from where it stopped
