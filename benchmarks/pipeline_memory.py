"""Column pipeline: per-stage peak activation memory and bubble at M = 2, 4, 8, 16
micro-batches, reversible stages against the same pipeline with plain autograd stages.

  OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/pipeline_memory.py [--model revcol_tiny --res 64]

Memory: peak live tensor bytes of one 1F1B step per stage (dispatch-level meter, gradient
buffers allocated beforehand, so it is activations, stashed boundaries, messages and
temporaries). Bubble: the share of the step a stage waits in receives, beside the 1F1B
figure (S-1)/(M+S-1). Rank 0 prints one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from revcol_dist.engine.losses import RevColLoss  # noqa: E402
from revcol_dist.models import create_model  # noqa: E402
from revcol_dist.monitor.live_bytes import LiveBytes  # noqa: E402
from revcol_dist.parallel.pipeline import PipelineEngine, bubble_fraction  # noqa: E402


def measure(mode: str, micro: int, args, images, labels) -> dict:
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000, drop_path=0.0, inter_supv=True, reversible=mode != "plain")
    engine = PipelineEngine(model, dist.get_world_size(), micro, res=args.res, zero_stash=mode == "zero_stash",
                            check_every=10**9, log=None)
    x, y = images[: micro * args.micro_batch], labels[: micro * args.micro_batch]
    batches = list(zip(x.chunk(micro), y.chunk(micro)))
    loss_fn = RevColLoss((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    engine.forward_backward(batches, loss_fn)  # warm-up (zero-stash: the drift check) and gradient buffers
    engine.forward_backward(batches, loss_fn)  # timed: no meter
    timing = dict(engine.timing)
    meter = LiveBytes()
    with meter:
        engine.forward_backward(batches, loss_fn)
    return {"peak": meter.peak, "bubble": timing["wait_s"] / timing["step_s"], "step_s": timing["step_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="revcol_tiny")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--micro", default="2,4,8,16")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, stages = dist.get_rank(), dist.get_world_size()
    micros = [int(m) for m in args.micro.split(",")]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(max(micros) * args.micro_batch, 3, args.res, args.res, generator=g)
    labels = torch.randint(0, 1000, (images.shape[0],), generator=g)
    rows = {}
    for mode in ("reversible", "zero_stash", "plain"):
        for m in micros:
            r = measure(mode, m, args, images, labels)
            gathered = [None] * stages
            dist.all_gather_object(gathered, r)
            rows[f"{mode}_M{m}"] = {"peak_mib_per_stage": [round(v["peak"] / 2**20, 2) for v in gathered],
                                    "bubble_per_stage": [round(v["bubble"], 3) for v in gathered],
                                    "bubble_1f1b": round(bubble_fraction(stages, m), 3),
                                    "step_s": round(max(v["step_s"] for v in gathered), 2)}
    if rank == 0:
        lo, hi = min(micros), max(micros)

        def ratio(a, b, s):
            return round(rows[a]["peak_mib_per_stage"][s] / rows[b]["peak_mib_per_stage"][s], 3)

        summary = {
            f"M{hi}_over_M{lo}": {mode: [ratio(f"{mode}_M{hi}", f"{mode}_M{lo}", s) for s in range(stages)]
                                  for mode in ("reversible", "zero_stash", "plain")},
            f"reversible_over_plain_M{hi}": [ratio(f"reversible_M{hi}", f"plain_M{hi}", s) for s in range(stages)],
            f"zero_stash_over_reversible_M{hi}": [ratio(f"zero_stash_M{hi}", f"reversible_M{hi}", s)
                                                  for s in range(stages)],
        }
        print(json.dumps({"benchmark": "pipeline_memory", "model": args.model, "res": args.res, "stages": stages,
                          "micro_batch": args.micro_batch, "summary": summary, "runs": rows}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
