"""Per-rank peak memory and step time of one optimizer step with train.grad_accum = 1, 2, 4, 8
at the same per-rank batch: what accumulation buys (activations of one micro-batch) and costs.

python benchmarks/grad_accum_memory.py          (one JSON line on stdout)

The step is the Trainer's: LocalBackend.forward_backward over the micro-batches with the
training loss, then backend.step. Memory: peak live tensor bytes of forward_backward, from
cleared gradients: the peak holds the gradients (parameter-sized, the same at any grad_accum)
plus the activations; ``activation_bytes`` is the peak less the gradients. Baseline: the same
batch without accumulation (grad_accum = 1). BENCH_MODEL, BENCH_BATCH, BENCH_RES to change.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from revcol_dist.engine.losses import RevColLoss  # noqa: E402
from revcol_dist.engine.optim import make_optimizer  # noqa: E402
from revcol_dist.models import create_model  # noqa: E402
from revcol_dist.monitor.live_bytes import LiveBytes  # noqa: E402
from revcol_dist.parallel.backends import LocalBackend  # noqa: E402
from revcol_dist.parallel.distributed import DistInfo  # noqa: E402


def run(model_name: str, accum: int, images, labels, loss_fn, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=1000, inter_supv=True)
    backend = LocalBackend(model, DistInfo(0, 1, 0), lambda m: make_optimizer(m, "adamw", 0.05), torch.device("cpu"))
    micro = list(zip(images.chunk(accum), labels.chunk(accum)))
    backend.forward_backward(micro, loss_fn)  # warm-up; gradient buffers and optimizer state exist after
    backend.step(1e-3)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.forward_backward(micro, loss_fn)
        backend.step(1e-3)
        times.append(time.perf_counter() - t0)
    backend.optimizer.zero_grad(set_to_none=True)
    with LiveBytes() as meter:
        backend.forward_backward(micro, loss_fn)
    grads = sum(p.numel() * p.element_size() for p in model.parameters())  # made inside the meter
    return {"peak_bytes": meter.peak, "activation_bytes": meter.peak - grads, "step_s": statistics.median(times)}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    name = os.environ.get("BENCH_MODEL", "revcol_tiny")
    batch, res = int(os.environ.get("BENCH_BATCH", "16")), int(os.environ.get("BENCH_RES", "96"))
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(batch, 3, res, res, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    loss_fn = RevColLoss((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    rows = {a: run(name, a, images, labels, loss_fn) for a in (1, 2, 4, 8) if batch % a == 0}
    base = rows[1]
    for r in rows.values():
        r["memory_vs_no_accum"] = round(r["peak_bytes"] / base["peak_bytes"], 3)
        r["activations_vs_no_accum"] = round(r["activation_bytes"] / base["activation_bytes"], 3)
        r["time_vs_no_accum"] = round(r["step_s"] / base["step_s"], 3)
    print(json.dumps({"benchmark": "grad_accum_memory", "model": name, "per_rank_batch": batch, "res": res,
                      "inter_supv": True, "grad_accum": rows}))


if __name__ == "__main__":
    main()
