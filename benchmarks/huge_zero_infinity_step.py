"""One real AdamW step of the 2.2B-parameter RevCol-H on a machine whose RAM cannot hold its
model states: ZeRO-3 across ranks, built with zero.Init straight into NVMe-offloaded partitions,
mixed-precision (bf16 weights, fp32 master weights and Adam moments on NVMe).

  MALLOC_MMAP_THRESHOLD_=131072 deepspeed --num_gpus 2 benchmarks/huge_zero_infinity_step.py \
      --nvme /tmp/revcol_nvme [--res 64]

(glibc's dynamic mmap threshold otherwise keeps every freed full-size weight of the zero.Init
build in the heap: RSS grew by the whole bf16 model per rank before the first step.)

Prints one JSON line: build and step time, loss, how many parameters changed, peak RSS per
rank, beside the planner's prediction for the same setting (ratio measured / predicted)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


TAG = "huge_step"


def ds_config(nvme: str, world: int) -> dict:
    return {
        "train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0, "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3, "contiguous_gradients": True, "overlap_comm": False,
            "reduce_bucket_size": 5 * 10**7, "stage3_prefetch_bucket_size": 5 * 10**7,
            "stage3_param_persistence_threshold": 10**5, "stage3_max_live_parameters": 10**8,
            # RAM-resident swap buffers kept small: 5 optimizer buffers of 5e7 elements (fp32 weights,
            # two moments, gradient, and one for states the optimizer creates on its first step), 4
            # parameter buffers just above the largest parameter (level-3 pwconv, 33.2M)
            "sub_group_size": 5 * 10**7,
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme, "pin_memory": False, "buffer_count": 5},
            "offload_param": {"device": "nvme", "nvme_path": nvme, "pin_memory": False, "buffer_count": 4,
                              "buffer_size": 4 * 10**7},
        },
        "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True},
        "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9,
    }


def fingerprints(model) -> list:
    """An integer checksum of every parameter's bits, gathered one parameter at a time."""
    import deepspeed

    out = []
    for p in model.parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out.append(int(p.detach().view(torch.int16).long().sum()) if p.dtype == torch.bfloat16
                       else float(p.detach().double().sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvme", default="/tmp/revcol_nvme")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2,
                    help="large enough that Adam's first step (about lr per element) survives bf16 rounding "
                         "of weights up to 1.0, so 'every parameter changed' is visible in the bf16 copy")
    ap.add_argument("--export", default=None, help="write the consolidated weights (authors' format) here")
    ap.add_argument("--save", default=None, help="write a sharded DeepSpeed checkpoint (every rank its part) here")
    ap.add_argument("--resume", default=None,
                    help="first load the --save checkpoint written by an earlier run (its weights must come back "
                         "bit for bit), then take the step")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = ap.parse_args()
    import deepspeed

    from revcol_dist.engine.losses import revcol_loss
    from revcol_dist.engine.optim import make_optimizer
    from revcol_dist.models import create_model
    from revcol_dist.parallel.deepspeed_env import init_deepspeed_distributed
    from revcol_dist.plan.model import PlanInput, make_plan

    init_deepspeed_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    nvme = os.path.join(args.nvme, f"rank{rank}")
    shutil.rmtree(nvme, ignore_errors=True)
    os.makedirs(nvme)
    cfg = ds_config(nvme, world)
    t0 = time.time()
    with deepspeed.zero.Init(config_dict_or_path=cfg, remote_device="nvme", dtype=torch.bfloat16):
        # drop path off: with one image per rank it silences whole blocks (zero gradients) at random
        model = create_model("revcol_huge", num_classes=1000, inter_supv=True, drop_path=0.0)
    n_params = sum(p.ds_numel for p in model.parameters())
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, "adamw", 0.05),
                                                   config=cfg)
    t_build = time.time() - t0
    resume_s, resumed_identical = None, None
    if args.resume:
        from revcol_dist.parallel.nvme_resume import prime_optimizer_state, restore_resident_state

        t4 = time.time()
        prime_optimizer_state(engine)
        path, _ = engine.load_checkpoint(args.resume, tag=TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        assert path is not None, f"no checkpoint {TAG} under {args.resume}"
        restore_resident_state(engine, Path(args.resume) / TAG)
        resume_s = round(time.time() - t4, 1)
        saved = json.loads((Path(args.resume) / TAG / "fingerprints.json").read_text())
        now = fingerprints(model)
        resumed_identical = sum(a == b for a, b in zip(saved, now))
    for g in optimizer.param_groups:
        g["lr"] = args.lr * g.get("lr_scale", 1.0)
    before = fingerprints(model)
    # every parameter must receive a non-zero gradient (then AdamW moves its fp32 master weight)
    params = list(model.parameters())
    grad_max = torch.zeros(len(params), dtype=torch.float64)

    def watch(i):
        def hook(g):
            grad_max[i] = max(float(grad_max[i]), float(g.detach().abs().max()))
        return hook

    handles = [p.register_hook(watch(i)) for i, p in enumerate(params)]
    torch.manual_seed(rank)
    x = torch.randn(1, 3, args.res, args.res)
    y = torch.randint(0, 1000, (1,))
    t1 = time.time()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = engine(x)
        loss, _ = revcol_loss(out, y, x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    t_fwd = time.time() - t1
    engine.backward(loss)
    for h in handles:
        h.remove()
    torch.distributed.all_reduce(grad_max, op=torch.distributed.ReduceOp.MAX)
    t_bwd = time.time() - t1 - t_fwd
    engine.step()
    t_step = time.time() - t1
    after = fingerprints(model)
    changed = sum(a != b for a, b in zip(before, after))
    names = [n for n, _ in model.named_parameters()]
    zero_grad = [names[i] for i in range(len(names)) if grad_max[i] == 0]
    unchanged = [names[i] for i in range(len(names)) if before[i] == after[i]]
    kinds = {}
    for n in unchanged:  # e.g. "level2.blocks.pwconv1.weight"
        key = ".".join(x for x in n.split(".")[2:] if not x.isdigit())
        kinds[key] = kinds.get(key, 0) + 1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    export_s, export_rss, export_params, export_variant = None, None, None, None
    if args.export:  # one parameter gathered at a time; only rank 0 keeps them
        from revcol_dist.engine.checkpoint import atomic_save
        from revcol_dist.models.official import to_official_key, inspect_state_dict

        t2 = time.time()
        sd = {}
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                if rank == 0:
                    sd[to_official_key(name, True)] = p.detach().clone()
        if rank == 0:
            atomic_save({"model": sd}, args.export)
            export_params = sum(t.numel() for t in sd.values())
            export_variant = inspect_state_dict(sd).describe()
        export_s = round(time.time() - t2, 1)
        export_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        del sd
    save_s, save_bytes = None, None
    if args.save:
        t3 = time.time()
        engine.save_checkpoint(args.save, tag=TAG)
        if rank == 0:  # what a resumed run must find again
            (Path(args.save) / TAG / "fingerprints.json").write_text(json.dumps(after))
        torch.distributed.barrier()
        save_s = round(time.time() - t3, 1)
        save_bytes = sum(f.stat().st_size for f in Path(args.save).rglob("*") if f.is_file())
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, {"rss": rss, "loss": float(loss), "export_rss": export_rss})
    if rank == 0:
        zc = cfg["zero_optimization"]
        plan = make_plan(PlanInput(model="revcol_huge", nodes=1, gpus_per_node=world, zero=3, offload="nvme",
                                   batch=1, res=args.res, precision="bf16", persistence_threshold=10**5,
                                   reduce_bucket=zc["reduce_bucket_size"], sub_group_size=zc["sub_group_size"],
                                   optimizer_buffers=zc["offload_optimizer"]["buffer_count"],
                                   param_buffers=zc["offload_param"]["buffer_count"],
                                   param_buffer_size=zc["offload_param"]["buffer_size"]))
        predicted_ram = plan["bytes_per_gpu"]["total"] + plan["host_bytes_per_gpu"]
        nvme_bytes = sum(f.stat().st_size for f in Path(args.nvme).rglob("*") if f.is_file())
        peak = max(g["rss"] for g in gathered)
        print(json.dumps({
            "benchmark": "huge_zero_infinity_step", "params": n_params, "ranks": world, "res": args.res,
            "loss": [g["loss"] for g in gathered], "params_tensors": len(before),
            "params_with_nonzero_grad": len(names) - len(zero_grad), "zero_grad_names": zero_grad[:10],
            "min_grad_max_abs": float(grad_max.min()),
            "bf16_weights_changed": changed, "bf16_unchanged_kinds": kinds,
            "build_s": round(t_build, 1), "forward_s": round(t_fwd, 1), "backward_s": round(t_bwd, 1),
            "step_total_s": round(t_step, 1), "peak_rss_bytes_per_rank": [g["rss"] for g in gathered],
            "peak_rss_sum_gib": round(sum(g["rss"] for g in gathered) / 2**30, 2),
            "nvme_bytes": nvme_bytes, "planner_nvme_bytes_per_rank": plan["nvme_bytes_per_gpu"],
            "planner_ram_bytes_per_rank": predicted_ram, "rss_over_planner": round(peak / predicted_ram, 2),
            "lr": args.lr, "resume_s": resume_s, "resumed_params_identical": resumed_identical,
            "save_s": save_s, "save_bytes": save_bytes, "export_s": export_s, "export_params": export_params, "export_variant": export_variant,
            "peak_rss_with_export_gib": [None if g["export_rss"] is None else round(g["export_rss"] / 2**30, 2)
                                         for g in gathered],
        }), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
