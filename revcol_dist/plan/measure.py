"""Measured per-rank memory of one training step, to hold the planner to account.

Run under a launcher (``torchrun --nproc_per_node N -m revcol_dist.plan.measure OUT.json
[MODEL:ZERO ...] [MODEL:ZERO:pSTAGES ...]``): for
each configuration, everything allocated from building the model (under ``zero.Init`` for
ZeRO-3) through DeepSpeed's initialisation, forward, backward and the AdamW step is watched by
a dispatch-level meter; the peak of live tensor bytes is set beside the planner's total."""

from __future__ import annotations

import gc
import json
import sys
import time

import torch

BUCKET = 5 * 10**6
PERSIST = 10**4
CONFIGS = [(m, z) for m in ("revcol_tiny", "revcol_small") for z in (0, 3)]
BATCH, RES = 2, 64


def zero_config(zero: int, world: int, batch: int = BATCH) -> dict:
    """DeepSpeed config with communication buckets sized for small models: the default (5e8
    elements) adds a fixed 2 GB fp32 bucket per rank that has nothing to do with sharding."""
    return {"train_batch_size": batch * world, "train_micro_batch_size_per_gpu": batch, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": zero, "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET,
                                  "stage3_prefetch_bucket_size": BUCKET, "stage3_param_persistence_threshold": PERSIST},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def build_and_step(model_name: str, zero: int, cfg: dict, batch: int = BATCH, res: int = RES):
    """Build (under zero.Init for ZeRO-3), initialise DeepSpeed with AdamW, take one step.
    Returns the engine and the model's parameter count."""
    import deepspeed

    from ..engine.optim import make_optimizer
    from ..models import create_model
    from ..parallel.backends import fetch_whole_blocks

    torch.manual_seed(0)
    if zero == 3:
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = create_model(model_name, num_classes=1000)
        fetch_whole_blocks(model)  # as the Trainer's DeepSpeedBackend does
    else:
        model = create_model(model_name, num_classes=1000)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, "adamw", 0.05), config=cfg)
    x = torch.randn(batch, 3, res, res, device=engine.device)  # where the engine computes (a GPU under NCCL)
    loss = engine(x).logits.float().logsumexp(1).mean()
    engine.backward(loss)
    engine.step()
    return engine, n_params


def measure(model_name: str, zero: int, world: int) -> int:
    """Peak live tensor bytes from building the model through one optimizer step (on a GPU,
    the allocator's peak: what the planner predicts is device memory)."""
    from ..monitor.live_bytes import LiveBytes

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        engine, _ = build_and_step(model_name, zero, zero_config(zero, world))
        peak = torch.cuda.max_memory_allocated()
    else:
        with LiveBytes() as meter:
            engine, _ = build_and_step(model_name, zero, zero_config(zero, world))
        peak = meter.peak
    del engine
    gc.collect()
    return peak


def pipeline_step(model_name: str, zero: int, stages: int, micro: int = 2):
    """What the Trainer does on a pipeline rank: the stage built from the meta device, the
    PipelineBackend (pipeline.zero), ``micro`` micro-batches of BATCH images, two AdamW steps
    (the second runs with the optimizer state the first created: the steady state)."""
    from functools import partial

    from ..config import PipelineSection
    from ..engine.losses import RevColLoss
    from ..engine.optim import make_optimizer
    from ..models import create_model
    from ..parallel import comm
    from ..parallel.distributed import DistInfo
    from ..parallel.pipeline.backend import PipelineBackend

    with torch.device("meta"):
        model = create_model(model_name, num_classes=1000, inter_supv=False)
    backend = PipelineBackend(model, DistInfo(comm.rank(), comm.world_size(), 0),
                              PipelineSection(stages=stages, micro_batches=micro, zero=zero),
                              partial(make_optimizer, name="adamw", weight_decay=0.05), res=RES, seed=0, log=None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(micro * BATCH, 3, RES, RES, generator=g).to(backend.engine.device)
    y = torch.randint(0, 1000, (micro * BATCH,), generator=g).to(backend.engine.device)
    loss_fn = RevColLoss((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for _ in range(2):
        backend.forward_backward(list(zip(x.chunk(micro), y.chunk(micro))), loss_fn)
        backend.step(1e-4)
    return backend


def measure_pipeline(model_name: str, zero: int, stages: int) -> int:
    from ..monitor.live_bytes import LiveBytes

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        backend = pipeline_step(model_name, zero, stages)
        peak = torch.cuda.max_memory_allocated()
    else:
        with LiveBytes() as meter:
            backend = pipeline_step(model_name, zero, stages)
        peak = meter.peak
    del backend
    gc.collect()
    return peak


def predicted(model_name: str, zero: int, world: int, stages: int = 1) -> int:
    from .model import PlanInput, make_plan

    plan = make_plan(PlanInput(model=model_name, nodes=1, gpus_per_node=world, zero=zero, batch=BATCH, res=RES,
                               precision="fp32", inter_supv=False, persistence_threshold=PERSIST,
                               reduce_bucket=BUCKET, pipeline=stages))
    return plan["bytes_per_gpu"]["total"]


def _parse(spec: str):
    """MODEL:ZERO (DeepSpeed) or MODEL:ZERO:pS (the pipeline in S stages, pipeline.zero)."""
    parts = spec.split(":")
    return parts[0], int(parts[1]), int(parts[2][1:]) if len(parts) > 2 else 1


def main(out: str, configs=None) -> None:
    from ..parallel import comm
    from ..parallel.deepspeed_env import init_deepspeed_distributed

    init_deepspeed_distributed()
    torch.set_num_threads(1)
    world = torch.distributed.get_world_size()
    rows = []
    for name, zero, stages in configs or [(m, z, 1) for m, z in CONFIGS]:
        start = time.perf_counter()
        peak = measure(name, zero, world) if stages == 1 else measure_pipeline(name, zero, stages)
        allp = comm.all_gather_object(peak)
        rows.append({"model": name, "zero": zero, "stages": stages, "world": world, "measured": max(allp),
                     "predicted": predicted(name, zero, world, stages),
                     "seconds": round(time.perf_counter() - start, 1)})
    if comm.rank() == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    comm.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], [_parse(c) for c in sys.argv[2:]])
