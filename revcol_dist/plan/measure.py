"""Measured per-rank memory of one training step, to hold the planner to account.

Run under a launcher (``torchrun --nproc_per_node N -m revcol_dist.plan.measure OUT.json
[MODEL:ZERO ...]``): for
each configuration, everything allocated from building the model (under ``zero.Init`` for
ZeRO-3) through DeepSpeed's initialisation, forward, backward and the AdamW step is watched by
a dispatch-level meter; the peak of live tensor bytes is set beside the planner's total."""

from __future__ import annotations

import gc
import json
import sys

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

    torch.manual_seed(0)
    if zero == 3:
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = create_model(model_name, num_classes=1000)
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


def predicted(model_name: str, zero: int, world: int) -> int:
    from .model import PlanInput, make_plan

    plan = make_plan(PlanInput(model=model_name, nodes=1, gpus_per_node=world, zero=zero, batch=BATCH, res=RES,
                               precision="fp32", inter_supv=False, persistence_threshold=PERSIST,
                               reduce_bucket=BUCKET))
    return plan["bytes_per_gpu"]["total"]


def main(out: str, configs=None) -> None:
    from ..parallel import comm
    from ..parallel.deepspeed_env import init_deepspeed_distributed

    init_deepspeed_distributed()
    torch.set_num_threads(1)
    world = torch.distributed.get_world_size()
    rows = []
    for name, zero in configs or CONFIGS:
        peak = measure(name, zero, world)
        allp = comm.all_gather_object(peak)
        rows.append({"model": name, "zero": zero, "world": world, "measured": max(allp),
                     "predicted": predicted(name, zero, world)})
    if comm.rank() == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    comm.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], [(c.split(":")[0], int(c.split(":")[1])) for c in sys.argv[2:]])
