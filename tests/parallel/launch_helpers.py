"""Running launchers/pretrain.py as real processes (single, torchrun, two 'nodes'), and several
runs of a launcher in one launch (scenario_worker.py)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = str(REPO / "launchers" / "pretrain.py")
SCENARIO_WORKER = REPO / "tests" / "parallel" / "scenario_worker.py"

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


def launch_scenarios(tmp, ranks, launcher, runs, name):
    """Several runs of ``launcher`` in one launch of ``ranks`` processes (scenario_worker.py)."""
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps([[str(a) for a in argv] for argv in runs]))
    head = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port())]
    return subprocess.run([*head, str(SCENARIO_WORKER), str(launcher), str(spec)], capture_output=True, text=True,
                          env=env(), timeout=1200, cwd=REPO)


class RunOutput(NamedTuple):
    """One run of a shared launch: whether every rank's ``main()`` returned 0, rank 0's output
    during the run, and the launch's stderr (for the failure message)."""
    ok: bool
    stdout: str
    stderr: str


def run_outputs(r: subprocess.CompletedProcess, n: int, ranks: int) -> list:
    """A launch of ``n`` runs (scenario_worker.py) split by run: a run that did not end on every
    rank with status 0 (or a launch that died before it ended) is not ok."""
    exits = defaultdict(dict)
    # not anchored to lines: the ranks' outputs meet in one pipe, a line of one may end in another's
    for i, status, rank in re.findall(r"scenario (\d+): exit (-?\w+) \(rank (\d+)\)", r.stdout):
        exits[int(i)][int(rank)] = status
    parts = re.split(r"scenario \d+: start", r.stdout)[1:]
    parts += [""] * (n - len(parts))
    return [RunOutput(sorted(exits[i]) == list(range(ranks)) and set(exits[i].values()) == {"0"}, parts[i], r.stderr)
            for i in range(n)]


def shared_launches(tmp, items: list, name: str) -> dict:
    """``items``: (key, ranks, argv); the runs of each rank count in one launch, in order;
    key -> RunOutput."""
    by_ranks = defaultdict(list)
    for key, ranks, argv in items:
        by_ranks[ranks].append((key, argv))
    done = {}
    for ranks, runs_ in by_ranks.items():
        r = launch_scenarios(tmp, ranks, REPO / "launchers" / "pretrain.py", [a for _, a in runs_], f"{name}_{ranks}ranks")
        done.update(zip([k for k, _ in runs_], run_outputs(r, len(runs_), ranks)))
    return done


def assert_ok(run: RunOutput, *context) -> None:
    """A run of a shared launch ended with status 0 on every rank; else its output in the failure."""
    assert run.ok, (*context, run.stdout[-2000:], run.stderr[-3000:])


def launch_runs(tmp: Path, data_root: Path, runs: dict, name: str) -> dict:
    """``runs``: name -> (ranks, write_config's settings, launcher arguments); each run's config
    written, the runs of each rank count in one launch (``shared_launches``); name -> RunOutput."""
    items = [(run, ranks, ["--config", write_config(tmp, run, data_root, **settings), *extra])
             for run, (ranks, settings, extra) in runs.items()]
    return shared_launches(tmp, items, name)
