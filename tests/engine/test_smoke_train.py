import json
import subprocess
import sys

import pytest
import torch

from revcol_dist.config import load_config
from revcol_dist.engine.schedule import lr_at
from revcol_dist.engine.train import train
from revcol_dist.models import create_model, load_official_checkpoint


def test_lr_schedule_by_hand():
    assert lr_at(0, 100, 10, 1e-3, 1e-6) == 0.0
    assert lr_at(5, 100, 10, 1e-3, 1e-6) == pytest.approx(5e-4)
    assert lr_at(10, 100, 10, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert lr_at(55, 100, 10, 1e-3, 1e-6) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert lr_at(100, 100, 10, 1e-3, 1e-6) == pytest.approx(1e-6)


@pytest.mark.slow
def test_short_training_learns_and_writes_checkpoint(tmp_path):
    cfg = load_config("configs/default.yaml", [f"output_dir={tmp_path}", "train.epochs=2", "train.log_every=1000",
                                               f"data.root={tmp_path}/digits"])
    logs = []
    metrics = train(cfg, log=logs.append)
    assert metrics["val_top1"] > 50.0  # 10 classes: chance is 10%
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["steps"] == metrics["steps"] > 0
    assert (tmp_path / "config.yaml").exists()
    m = create_model(cfg.model.name, **{"num_classes": 10, **cfg.model.args})  # 10: the digits (from the data)
    report = load_official_checkpoint(m, tmp_path / "model_official.pth")
    assert not report.missing
    log = [json.loads(l) for l in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, metrics["steps"] + 1))
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.5 * first  # the loss falls


@pytest.mark.launches
def test_launcher_rejects_unknown_key_in_one_line():
    r = subprocess.run([sys.executable, "launchers/pretrain.py", "--set", "train.lrr=1"], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: unknown config key 'train.lrr' (did you mean 'train.lr'?); valid keys here: epochs,")
