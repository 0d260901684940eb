"""launchers/finetune.py and launchers/evaluate.py as real processes, and the published recipes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from revcol_dist.config import load_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.launches  # every test here waits on a launcher
TINY = ["model.args.channels=[8,16,24,32]", "model.args.layers=[1,1,1,1]", "train.batch_size=32",
        "monitor.console=plain", "data.backend=torch"]


def _run(script, *args):
    return subprocess.run([sys.executable, str(REPO / "launchers" / script), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def _sets(*kv):
    return [a for k in kv for a in ("--set", k)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    out = tmp / "pre"
    r = _run("pretrain.py", "--config", "configs/default.yaml",
             *_sets(*TINY, f"output_dir={out}", f"data.root={tmp}/digits", "train.epochs=2", "train.ema_decay=0.9"))
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, out


@pytest.mark.slow
def test_evaluate_reproduces_the_runs_own_figures(pretrained):
    tmp, out = pretrained
    metrics = json.loads((out / "metrics.json").read_text())
    for ckpt, extra, key in [(out / "model_official.pth", [], "val_top1"),
                             (out / "model_official.pth", ["--ema"], "val_ema_top1"),
                             (sorted((out / "checkpoints").glob("step_*"))[-1], [], "val_top1")]:
        res_path = tmp / "eval.json"
        r = _run("evaluate.py", "--checkpoint", str(ckpt), *extra, "--json", str(res_path))
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(res_path.read_text())
        assert res["n"] == 359 and res["top1"] == pytest.approx(metrics[key], abs=1e-9), (ckpt, extra)
    assert metrics["val_ema_top1"] != metrics["val_top1"] or metrics["val_ema_top5"] != metrics["val_top5"]


@pytest.mark.slow
def test_finetune_starts_from_the_pretrained_weights(pretrained):
    tmp, out = pretrained
    common = [*TINY, f"data.root={tmp}/digits", "train.max_steps=3", "train.layer_decay=0.8",
              "model.args.head_init_scale=0.001", "train.lr=1.0e-4"]
    r = _run("finetune.py", "--config", "configs/default.yaml", "--pretrained", str(out / "model_official.pth"),
             *_sets(*common, f"output_dir={tmp}/ft"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded " in r.stdout and "model_official.pth" in r.stdout
    r = _run("pretrain.py", "--config", "configs/default.yaml", *_sets(*common, f"output_dir={tmp}/scratch"))
    assert r.returncode == 0, r.stderr[-3000:]
    first = lambda d: json.loads((tmp / d / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    assert first("ft") < 0.5 * first("scratch")  # ln(10) = 2.30 from scratch; the pre-trained model knows digits
    ours = tmp / "ft_from_folder"
    folder = sorted((out / "checkpoints").glob("step_*"))[-1]
    r = _run("finetune.py", "--config", "configs/default.yaml", "--pretrained", str(folder),
             *_sets(*common, f"output_dir={ours}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert first("ft_from_folder") == pytest.approx(first("ft"), rel=1e-6)


def test_finetune_and_evaluate_bad_input_one_line(tmp_path):
    r = _run("finetune.py", "--config", "configs/default.yaml")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: fine-tuning needs pre-trained")
    r = _run("evaluate.py", "--checkpoint", str(tmp_path / "nope.pth"))
    assert r.returncode == 2 and "checkpoint not found" in r.stderr
    bare = tmp_path / "released.pth"  # the authors' format carries a yacs config, not ours
    torch.save({"model": {}, "config": {"MODEL": {"TYPE": "revcol_tiny"}}}, bare)
    r = _run("evaluate.py", "--checkpoint", str(bare))
    assert r.returncode == 2 and "pass --config" in r.stderr


PUBLISHED = {  # (epochs, warm-up, lr, min lr, weight decay, drop path, clip, EMA, layer decay, mixup, inter_supv)
    "revcol_tiny_1k": (300, 20, 1e-3, 1e-6, 0.05, 0.1, None, 0.9999, 1.0, 0.8, True),
    "revcol_small_1k": (300, 20, 1e-3, 1e-6, 0.05, 0.3, None, 0.9999, 1.0, 0.8, True),
    "revcol_base_1k": (300, 20, 1e-3, 1e-8, 0.05, 0.4, 5.0, 0.9999, 1.0, 0.8, True),
    "revcol_base_22k": (90, 5, 1.25e-4, 1e-7, 0.1, 0.3, 10.0, 0.0, 1.0, 0.8, True),
    "revcol_large_22k": (90, 5, 1.25e-4, 1e-7, 0.1, 0.3, 10.0, 0.0, 1.0, 0.8, True),
    "revcol_xlarge_22k": (90, 5, 1.25e-4, 1e-7, 0.1, 0.4, 10.0, 0.0, 1.0, 0.8, True),
    "revcol_base_1k_224_ft": (30, 0, 1e-4, 2e-7, 1e-8, 0.2, 10.0, 0.0, 0.9, 0.0, False),
    "revcol_base_1k_384_ft": (30, 0, 1e-4, 2e-7, 1e-8, 0.2, 10.0, 0.0, 0.9, 0.0, False),
    "revcol_large_1k_224_ft": (30, 0, 5e-5, 2e-7, 1e-8, 0.3, 10.0, 0.0, 0.8, 0.0, False),
    "revcol_large_1k_384_ft": (30, 0, 5e-5, 2e-7, 1e-8, 0.3, 10.0, 0.0, 0.8, 0.0, False),
    "revcol_xlarge_1k_384_ft": (30, 0, 2e-5, 2e-7, 1e-8, 0.4, 10.0, 0.9999, 0.8, 0.0, False),
    "revcol_huge_1k_640_ft": (20, 0, 4e-5, 2e-8, 1e-8, 0.4, 100.0, 0.9999, 0.8, 0.0, False),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipe_files_hold_the_published_values(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    ep, warm, lr, mn, wd, dp, clip, ema, ld, mixup, supv = PUBLISHED[name]
    t = cfg.train
    assert (t.epochs, t.warmup_epochs, t.lr, t.min_lr, t.weight_decay) == (ep, warm, lr, mn, wd)
    assert (cfg.model.args["drop_path"], t.clip_grad, t.ema_decay, t.layer_decay) == (dp, clip, ema, ld)
    assert (cfg.data.mixup, cfg.model.args["inter_supv"], t.lr_base_batch, t.label_smoothing) == (mixup, supv, 1024, 0.1)
    assert cfg.data.randaug and cfg.data.erasing == 0.25 and t.optimizer == "adamw"
    assert cfg.model.name == "revcol_" + name.split("_")[1]
    if name.endswith("_ft"):
        assert cfg.model.args["head_init_scale"] == 0.001 and cfg.data.img_size == int(name.split("_")[3])
