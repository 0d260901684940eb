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
    cfg = load_config("configs/default.yaml", [f"output_dir={tmp_path}", "train.epochs=2", "train.log_every=1000"])
    logs = []
    metrics = train(cfg, log=logs.append)
    assert metrics["val_top1"] > 50.0  # 10 classes: chance is 10%
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["steps"] == metrics["steps"] > 0
    assert (tmp_path / "config.yaml").exists()
    m = create_model(cfg.model.name, **cfg.model.args)
    report = load_official_checkpoint(m, tmp_path / "checkpoint.pth")
    assert not report.missing


def test_launcher_rejects_unknown_key_in_one_line():
    r = subprocess.run([sys.executable, "launchers/pretrain.py", "--set", "train.lrr=1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: unknown config key 'train.lrr' (did you mean 'train.lr'?); "
                                             "valid keys here: epochs, batch_size, lr, min_lr, warmup_epochs, "
                                             "weight_decay, clip_grad, seed, log_every, max_steps"]
