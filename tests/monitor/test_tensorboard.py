"""A short run writes the documented TensorBoard tags (read back with EventAccumulator), its loss
falls, the decoders' reconstructions of the same samples get closer to them, and a non-finite
loss skips the step without touching the weights."""

import json

import numpy as np

import pytest
import torch

from revcol_dist.config import load_config
from revcol_dist.engine.schedule import lr_at
from revcol_dist.engine.train import TrainingError, train
from revcol_dist.monitor.tensorboard import ALPHA, RECONSTRUCTIONS, tag

TINY = ["model.args.channels=[8,16,24,32]", "model.args.layers=[1,1,1,1]", "model.args.inter_supv=true",
        "train.batch_size=32", "train.log_every=2", "monitor.console=plain",
        "data.backend=torch"]  # per-sample seeded augmentation: two runs see identical images


def _cfg(tmp_path, name, *extra):
    return load_config("configs/default.yaml", [f"output_dir={tmp_path / name}", f"data.root={tmp_path}/digits",
                                                *TINY, *extra])


@pytest.mark.slow
def test_tensorboard_tags_and_falling_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, "run", "train.epochs=2", "train.ema_decay=0.9", "train.eval_every_epochs=1",
               "monitor.images_every=10")
    said = []
    metrics = train(cfg, log=said.append)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"1_overview/1_train_loss", "1_overview/2_val_top1", "1_overview/3_lr", "1_overview/4_images_per_sec",
            "2_val/top5", "2_val/loss", "2_val/top1_ema", "2_val/top5_ema", "2_val/loss_ema",
            "5_speed/images_per_sec_per_device", "5_speed/data_wait_share", "5_speed/step_time",
            "6_health/grad_norm", "6_health/drift", "6_health/alpha_min", "6_health/mem_peak_bytes"}
    want |= {f"3_loss_terms/cls_{i}" for i in range(4)} | {f"3_loss_terms/rec_{i}" for i in range(3)}
    assert tags == want, tags ^ want  # nothing else: every tag in its numbered group
    # MFU on a CPU: nothing logged, and the console says once why and what provides it
    notes = [m for m in said if "MFU" in m]
    assert len(notes) == 1 and "monitor.peak_tflops=" in notes[0], notes
    _check_front_page(acc, tags)
    _check_alpha_histograms(acc, steps=metrics["steps"], log_every=2)
    _check_reconstruction_images(acc, steps=metrics["steps"], every=10, img=64, decoders=3)  # 32 px, enlarged
    loss = [e.value for e in acc.Scalars(tag("loss"))]
    assert len(loss) >= 10 and sum(loss[-3:]) / 3 < 0.7 * sum(loss[:3]) / 3
    steps = metrics["steps"]
    total, warmup = steps, steps // 2  # 2 epochs, 1 of warm-up
    for e in acc.Scalars(tag("lr")):  # logged after step s: the LR that step used
        assert e.value == pytest.approx(lr_at(e.step - 1, total, warmup, 2e-3, 1e-5), rel=1e-5)
    val = acc.Scalars(tag("val/top1"))
    assert [e.step for e in val] == [steps // 2, steps]  # after epoch 1 and at the end
    assert val[-1].value == pytest.approx(metrics["val_top1"])
    assert all(0 < e.value < 10 for e in acc.Scalars(tag("drift")))  # a relative error, measured
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"val_top1", "val_top5", "train_loss", "images_per_sec", "peak_mem_bytes", "steps"} <= saved.keys()
    assert saved["peak_mem_bytes"] > 10 * 2**20


def _check_front_page(acc, tags):
    """The custom-scalars layout: training (loss, its terms per head and per decoder, LR,
    throughput) before validation before health; every chart draws tags the run wrote (the
    plugin's re.match), so none is empty: no MFU chart on a CPU, where MFU is not logged."""
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2

    [event] = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    titles = [c.title for c in layout.category]
    assert titles == ["1. training", "2. validation", "3. health"]
    charts = {c.title: [ch.title for ch in c.chart] for c in layout.category}
    assert charts["1. training"][:3] == ["loss", "classification loss per head", "reconstruction loss per decoder"]
    assert {"learning rate", "throughput (images/s)"} <= set(charts["1. training"])
    assert "model FLOPs utilisation" not in charts["1. training"]
    assert charts["2. validation"][:2] == ["top-1 (%)", "top-5 (%)"]
    for c in layout.category:
        for ch in c.chart:
            drawn = [t for t in tags for p in ch.multiline.tag if re.match(p, t)]
            assert len(drawn) == len(ch.multiline.tag), (ch.title, drawn)  # each pattern: one written tag


def _check_alpha_histograms(acc, steps, log_every):
    """One histogram per level, of |alpha| over all 4 columns' channels, every log interval."""
    hists = set(acc.Tags()["histograms"])
    assert hists == {ALPHA.format(l) for l in range(4)}
    for level, channels in enumerate([8, 16, 24, 32]):
        events = acc.Histograms(ALPHA.format(level))
        assert [e.step for e in events] == [s for s in range(1, steps + 1) if s % log_every == 0 or s == steps]
        h = events[-1].histogram_value
        assert h.num == 4 * channels and 0 < h.min <= h.max < 10


def _check_reconstruction_images(acc, steps, every, img, decoders):
    """At the first step, every `every` steps and the last: rows of samples, each its input then
    each decoder's image; the same samples every time."""
    events = acc.Images(RECONSTRUCTIONS)
    assert [e.step for e in events] == [1, *range(every, steps + 1, every), *([steps] if steps % every else [])]
    first, last = _tiles(events[0], img), _tiles(events[-1], img)
    assert last.shape == (1 + decoders, 4 * img, img, 3)  # input + each decoder; 4 samples a column
    assert torch.equal(first[0], last[0])  # the same inputs, to compare by
    assert last[0].std() > 0.1 and last[1:].std() > 0.004  # pictures, not blank tiles


def _tiles(event, img):
    """[1 + decoders, rows * img, img, 3] in [0, 1]: the image's columns (input, then each decoder)."""
    import io

    from PIL import Image

    pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"),
                                         dtype=np.float32) / 255)
    return torch.stack(pixels.split(img, dim=1))


@pytest.mark.slow
def test_reconstructions_get_closer_to_their_inputs(tmp_path):
    """A run that learns to reconstruct (the main job's model with intermediate supervision, 100
    steps of 32): the last logged image's decoders are closer to the same inputs than the first's,
    and no longer flat grey."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config("configs/default.yaml", [f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path}/digits",
                                                "model.args.inter_supv=true", "train.batch_size=32",
                                                "train.max_steps=100", "train.warmup_epochs=0.2", "train.log_every=50",
                                                "monitor.images_every=50", "monitor.console=none",
                                                "data.backend=torch"])
    train(cfg, log=lambda *_: None)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    events = acc.Images(RECONSTRUCTIONS)
    assert [e.step for e in events] == [1, 50, 100]
    first, last = _tiles(events[0], 64), _tiles(events[-1], 64)
    assert torch.equal(first[0], last[0])  # the same four samples
    error = lambda tiles: (tiles[1:] - tiles[0]).abs().mean(dim=(1, 2, 3))  # noqa: E731  per decoder
    assert (error(last) < 0.85 * error(first)).all(), (error(first), error(last))
    assert (last[1:].std(dim=(1, 2, 3)) > 3 * first[1:].std(dim=(1, 2, 3))).all()  # shapes, not flat grey


@pytest.mark.slow
def test_nan_loss_skips_the_step_then_stops(tmp_path, monkeypatch):
    constant = ["train.warmup_epochs=0", "train.min_lr=2.0e-3", "train.ema_decay=0.5"]  # LR independent of length
    a = _cfg(tmp_path, "four", "train.max_steps=4", *constant)
    train(a, log=lambda *_: None)
    monkeypatch.setenv("REVCOL_NAN_STEPS", "5")  # rank 0's loss is NaN at step 5
    b = _cfg(tmp_path, "five_one_nan", "train.max_steps=5", *constant)
    metrics = train(b, log=lambda *_: None)
    assert metrics["nan_skipped"] == 1 and metrics["steps"] == 5
    log = [json.loads(l) for l in (tmp_path / "five_one_nan" / "train_log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in log] == [False] * 4 + [True]
    wa = torch.load(tmp_path / "four" / "model_official.pth", weights_only=True)
    wb = torch.load(tmp_path / "five_one_nan" / "model_official.pth", weights_only=True)
    for entry in ("model", "state_dict_ema"):  # the skipped step changed neither weights nor EMA
        assert all(torch.equal(wa[entry][k], wb[entry][k]) for k in wa[entry])
    monkeypatch.setenv("REVCOL_NAN_STEPS", "2,3,4")
    c = _cfg(tmp_path, "stuck", "train.max_steps=6", "train.max_nan_skips=2")
    with pytest.raises(TrainingError, match="non-finite for 3 steps in a row"):
        train(c, log=lambda *_: None)
