"""Running launchers/pretrain.py as real processes (single, torchrun, two 'nodes')."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = str(REPO / "launchers" / "pretrain.py")

TINY_CONFIG = """
model:
  name: revcol_tiny
  args:
    channels: [8, 16, 24, 32]
    layers: [1, 1, 1, 1]
    num_columns: 4
    drop_path: 0.2  # keyed by sample: every layout must draw the same masks
    inter_supv: true
data:
  dataset: digits
  backend: torch  # per-sample augmentation seeds: identical images at any world size
  root: {data_root}
  img_size: 32
  min_crop_scale: 0.75
  hflip: false
train:
  epochs: 1
  batch_size: 8
  optimizer: {optimizer}
  lr: {lr}
  min_lr: 1.0e-4
  warmup_epochs: 0
  weight_decay: 0.05
  layer_decay: 0.7  # per-group LRs must survive every ZeRO optimizer wrapper
  ema_decay: 0.5  # sharded under ZeRO-3: must still equal the single-process EMA
  seed: 0
  log_every: 1000
  max_steps: {steps}
  checkpoint_every: {every}
output_dir: {out}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp: Path, name: str, data_root: Path, steps: int = 3, every: int = 0, optimizer: str = "sgd") -> Path:
    """SGD by default: Adam's update divides by sqrt(v), so elements whose gradient is pure
    rounding noise move by a full step either way; SGD keeps the comparison about the engines."""
    out = tmp / name
    cfg = tmp / f"{name}.yaml"
    lr = "0.05" if optimizer == "sgd" else "2.0e-3"
    cfg.write_text(TINY_CONFIG.format(data_root=data_root, steps=steps, every=every, out=out, optimizer=optimizer, lr=lr))
    return cfg


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_single(cfg: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LAUNCHER, "--config", str(cfg), *extra],
                          capture_output=True, text=True, env=env(), timeout=timeout, cwd=REPO)


def run_torchrun(cfg: Path, nproc: int, *extra: str, timeout: int = 600, launcher=LAUNCHER) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           str(launcher), "--config", str(cfg), *extra],
                          capture_output=True, text=True, env=env(), timeout=timeout, cwd=REPO)


def kill_once_logged(cmd, out_dir: Path, steps: int, extra_env=None, timeout: int = 300) -> subprocess.Popen:
    """Start ``cmd``, SIGKILL it once ``steps`` steps are in its train_log.jsonl; the dead process."""
    import signal
    import time

    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                         env=dict(env(), **(extra_env or {})))
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = out_dir / "train_log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= steps:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    return p


def losses(out_dir: Path) -> dict:
    """step -> loss, the last record of each step (a resumed run repeats some)."""
    d = {}
    for line in (out_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        d[rec["step"]] = rec["loss"]
    return d


def weights(out_dir: Path, entry: str = "model") -> dict:
    """The exported weights ("model") or their moving average ("state_dict_ema")."""
    return torch.load(out_dir / "model_official.pth", map_location="cpu", weights_only=True)[entry]


def worst_relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        denom = a[k].float().norm().item()
        diff = (a[k].float() - b[k].float()).norm().item()
        worst = max(worst, diff / denom if denom else diff)
    return worst
