"""Pipeline x ZeRO: per-rank memory and step time of the column pipeline with pipeline.zero
0, 1 and 2 (optimizer states, then gradients too, sharded over each stage's replicas), in the
same run, through the PipelineBackend the Trainer uses (AdamW, stage-local build).

  OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 benchmarks/pipeline_zero.py   # 2 stages x 2 replicas

Per rank: bytes of parameters, of gradients held when the optimizer steps, of optimizer
state, and their sum (what stays between steps); the step's time (the slowest rank's median).
Rank 0 prints one JSON line; the ratios are against pipeline.zero=0 (the baseline: replicated
stages, as DeepSpeed's pipeline engine keeps them beyond ZeRO-1)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from revcol_dist.config import PipelineSection  # noqa: E402
from revcol_dist.engine.losses import RevColLoss  # noqa: E402
from revcol_dist.engine.optim import make_optimizer  # noqa: E402
from revcol_dist.models import create_model  # noqa: E402
from revcol_dist.parallel.distributed import DistInfo  # noqa: E402
from revcol_dist.parallel.pipeline.backend import PipelineBackend  # noqa: E402


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure(zero: int, args, batches) -> dict:
    with torch.device("meta"):
        model = create_model(args.model, num_classes=1000, inter_supv=True)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), 0)
    pipe = PipelineSection(stages=args.stages, micro_batches=len(batches), zero=zero)
    backend = PipelineBackend(model, info, pipe, partial(make_optimizer, name="adamw", weight_decay=0.05),
                              res=args.res, seed=0, log=None)
    loss_fn = RevColLoss((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    times, grads = [], 0
    for i in range(args.steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        backend.forward_backward(batches, loss_fn)
        grads = _bytes(p.grad for p in backend.engine.params)  # what the optimizer steps with
        backend.step(1e-4)
        if i:  # the first step creates the optimizer state
            times.append(time.perf_counter() - t0)
    params = _bytes(backend.engine.params)
    states = backend.optimizer_state_bytes()
    return {"param": params, "grad": grads, "state": states, "total": params + grads + states,
            "step_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="revcol_small")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.micro * args.micro_batch, 3, args.res, args.res, generator=g)
    labels = torch.randint(0, 1000, (images.shape[0],), generator=g)
    batches = list(zip(images.chunk(args.micro), labels.chunk(args.micro)))
    rows = {}
    for zero in (0, 1, 2):
        r = measure(zero, args, batches)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, r)
        mib = {k: [round(v[k] / 2**20, 1) for v in gathered] for k in ("param", "grad", "state", "total")}
        rows[f"zero{zero}"] = {**{f"{k}_mib_per_rank": v for k, v in mib.items()},
                               "step_s": round(max(v["step_s"] for v in gathered), 3)}
    if dist.get_rank() == 0:
        def ratio(key, z):
            return round(max(rows[z][key]) / max(rows["zero0"][key]), 3)

        summary = {f"zero{z}_over_zero0": {"state": ratio("state_mib_per_rank", f"zero{z}"),
                                           "grad": ratio("grad_mib_per_rank", f"zero{z}"),
                                           "total": ratio("total_mib_per_rank", f"zero{z}"),
                                           "step_time": round(rows[f"zero{z}"]["step_s"] / rows["zero0"]["step_s"], 3)}
                   for z in (1, 2)}
        print(json.dumps({"benchmark": "pipeline_zero", "model": args.model, "stages": args.stages,
                          "replicas": dist.get_world_size() // args.stages, "res": args.res,
                          "micro_batches": args.micro, "summary": summary, "runs": rows}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
