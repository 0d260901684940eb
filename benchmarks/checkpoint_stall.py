"""Training stall per checkpoint save, synchronous against asynchronous (train.async_checkpoint),
for RevCol-S and RevCol-L: the time of the step that saves, minus the median step time.

python benchmarks/checkpoint_stall.py          (one JSON line on stdout; BENCH_MODELS to change)

One process, the Trainer's pieces: LocalBackend with AdamW, the CheckpointManager writing
model, optimizer and a client state into a temporary folder every SAVE_EVERY steps, batch 2 at
64x64. The baseline is the synchronous save (what training does without the option).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from revcol_dist.engine.checkpoint import CheckpointManager, rng_state  # noqa: E402
from revcol_dist.engine.losses import RevColLoss  # noqa: E402
from revcol_dist.engine.optim import make_optimizer  # noqa: E402
from revcol_dist.models import create_model  # noqa: E402
from revcol_dist.parallel.backends import LocalBackend  # noqa: E402
from revcol_dist.parallel.distributed import DistInfo  # noqa: E402

STEPS, SAVE_EVERY = 13, 4


def run(name: str, asynchronous: bool, root: Path) -> dict:
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000)
    backend = LocalBackend(model, DistInfo(0, 1, 0), lambda m: make_optimizer(m, "adamw", 0.05), torch.device("cpu"))
    ckpts = CheckpointManager(root, 0, 1, keep=1, asynchronous=asynchronous, log=lambda *_: None)
    loss_fn = RevColLoss((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 1000, (2,), generator=g))]
    plain, saving, save_wall = [], [], []
    for step in range(1, STEPS + 1):
        t0 = time.perf_counter()
        backend.forward_backward(batch, loss_fn)
        backend.step(1e-4)
        if step % SAVE_EVERY == 0:
            t1 = time.perf_counter()
            ckpts.save(backend, step, {"step": step, "rng": rng_state()}, {"model": name})
            save_wall.append(time.perf_counter() - t1)
        elapsed = time.perf_counter() - t0
        if step > 1:  # the first step warms up
            (saving if step % SAVE_EVERY == 0 else plain).append(elapsed)
    t2 = time.perf_counter()
    ckpts.wait()
    tail = time.perf_counter() - t2
    median = statistics.median(plain)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return {"median_step_s": round(median, 3), "stall_per_save_s": round(statistics.mean(saving) - median, 3),
            "save_call_s": round(statistics.mean(save_wall), 3), "final_wait_s": round(tail, 3),
            "checkpoint_bytes": size}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    out = {"benchmark": "checkpoint_stall", "steps": STEPS, "save_every": SAVE_EVERY, "batch": 2, "res": 64}
    for name in os.environ.get("BENCH_MODELS", "revcol_small,revcol_large").split(","):
        rows = {}
        for mode in ("sync", "async"):
            with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
                rows[mode] = run(name, mode == "async", Path(d) / "checkpoints")
        rows["async_stall_vs_sync"] = round(rows["async"]["stall_per_save_s"] / max(rows["sync"]["stall_per_save_s"],
                                                                                   1e-9), 3)
        out[name] = rows
    print(json.dumps(out))


if __name__ == "__main__":
    main()
