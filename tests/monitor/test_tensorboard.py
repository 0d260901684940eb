"""A short run writes the documented TensorBoard tags (read back with EventAccumulator), its loss
falls, and a non-finite loss skips the step without touching the weights."""

import json

import numpy as np

import pytest
import torch

from revcol_dist.config import load_config
from revcol_dist.engine.schedule import lr_at
from revcol_dist.engine.train import TrainingError, train

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
    metrics = train(cfg, log=lambda *_: None)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"train/loss", "train/lr", "train/grad_norm", "train/images_per_sec", "train/step_time",
            "sys/mem_peak_bytes", "rev/drift", "rev/alpha_min", "val/top1", "val/top5", "val_ema/top1",
            "val_ema/top5"}
    want |= {f"train/loss_cls_{i}" for i in range(4)} | {f"train/loss_rec_{i}" for i in range(3)}
    assert want <= tags, want - tags
    assert not any(t.startswith("model/alpha") for t in tags)  # no longer 32 scalar cards
    _check_front_page(acc, tags)
    _check_alpha_histograms(acc, steps=metrics["steps"], log_every=2)
    _check_reconstruction_images(acc, steps=metrics["steps"], every=10, img=64, decoders=3)  # 32 px, enlarged
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert len(loss) >= 10 and sum(loss[-3:]) / 3 < 0.7 * sum(loss[:3]) / 3
    steps = metrics["steps"]
    total, warmup = steps, steps // 2  # 2 epochs, 1 of warm-up
    for e in acc.Scalars("train/lr"):  # logged after step s: the LR that step used
        assert e.value == pytest.approx(lr_at(e.step - 1, total, warmup, 2e-3, 1e-5), rel=1e-5)
    val = acc.Scalars("val/top1")
    assert [e.step for e in val] == [steps // 2, steps]  # after epoch 1 and at the end
    assert val[-1].value == pytest.approx(metrics["val_top1"])
    assert all(0 < e.value < 10 for e in acc.Scalars("rev/drift"))  # a relative error, measured
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"val_top1", "val_top5", "train_loss", "images_per_sec", "peak_mem_bytes", "steps"} <= saved.keys()
    assert saved["peak_mem_bytes"] > 10 * 2**20


def _check_front_page(acc, tags):
    """The custom-scalars layout: training (loss per head, LR, throughput) before validation
    before health, and every chart's tags are ones the run wrote."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    [event] = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    titles = [c.title for c in layout.category]
    assert titles == ["1. training", "2. validation", "3. health"]
    charts = {c.title: [ch.title for ch in c.chart] for c in layout.category}
    assert charts["1. training"][:2] == ["loss", "classification loss per head"]
    assert {"learning rate", "throughput (images/s)", "reconstruction loss per decoder"} <= set(charts["1. training"])
    assert charts["2. validation"][:2] == ["top-1 (%)", "top-5 (%)"]
    written = [t for c in layout.category for ch in c.chart for t in ch.multiline.tag]
    # (MFU needs the device's peak: none on a CPU, so that chart stays empty here)
    assert set(written) <= tags | {"val_ema/loss", "val/loss", "train/mfu"}, set(written) - tags
    assert {"train/images_per_sec_per_device", "train/data_wait_share"} <= tags
    assert {f"train/loss_cls_{i}" for i in range(4)} <= set(written)


def _check_alpha_histograms(acc, steps, log_every):
    """One histogram per level, of |alpha| over all 4 columns' channels, every log interval."""
    hists = set(acc.Tags()["histograms"])
    assert hists == {f"alpha/level_{l}" for l in range(4)}
    for level, channels in enumerate([8, 16, 24, 32]):
        events = acc.Histograms(f"alpha/level_{level}")
        assert [e.step for e in events] == [s for s in range(1, steps + 1) if s % log_every == 0 or s == steps]
        h = events[-1].histogram_value
        assert h.num == 4 * channels and 0 < h.min <= h.max < 10


def _check_reconstruction_images(acc, steps, every, img, decoders):
    """Every `every` steps: rows of samples, each its input then each decoder's image."""
    import io

    from PIL import Image

    events = acc.Images("reconstructions/input_then_decoders")
    assert [e.step for e in events] == list(range(every, steps + 1, every))
    pic = Image.open(io.BytesIO(events[-1].encoded_image_string))
    assert pic.size == ((1 + decoders) * img, 4 * img)  # (width, height): 4 samples
    pixels = torch.from_numpy(np.asarray(pic.convert("L"), dtype=np.float32))
    inputs, decoded = pixels[:, :img], pixels[:, img:]
    assert inputs.std() > 10 and decoded.std() > 1  # pictures, not blank tiles


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
