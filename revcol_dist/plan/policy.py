"""``model.memory_policy: auto``: the fastest memory policy that fits the device.

Plain autograd (every activation kept) is the fastest step where it fits; the reversible
columns keep memory independent of the column count at the price of recomputing them. The
planner's figures for the configured micro-batch decide, against the device's memory."""

from __future__ import annotations

from dataclasses import replace
from typing import Tuple

from .model import GIB, PlanInput, make_plan

POLICIES = ("reversible", "plain", "auto")


def choose_memory_policy(inp: PlanInput) -> Tuple[str, str]:
    """("plain" | "reversible", the reason in one line) for ``inp`` (its gpu_mem_gib: the
    device's memory; plain_columns is set here)."""
    from ..models import get_variant

    columns = get_variant(inp.model).replace(**inp.model_args).num_columns
    plain = make_plan(replace(inp, plain_columns=columns, lean_blocks=False))  # autograd's own saved tensors
    need = plain["bytes_per_gpu"]["total"] / GIB
    if plain["fits"]:
        return "plain", (f"plain autograd fits: {need:.1f} GiB planned of {inp.gpu_mem_gib:.0f} GiB at micro-batch "
                         f"{inp.batch} (the fastest step; no recomputation)")
    rev = make_plan(inp)["bytes_per_gpu"]["total"] / GIB
    return "reversible", (f"plain autograd would need {need:.1f} GiB of {inp.gpu_mem_gib:.0f} GiB at micro-batch "
                          f"{inp.batch}: reversible columns, {rev:.1f} GiB planned")


def resolve_memory_policy(cfg, ds_config=None, say=print):
    """``cfg`` with model.memory_policy=auto replaced by the planner's choice for this launch
    (the GPU's memory, world size, ZeRO stage or pipeline, per-GPU micro-batch); the choice and
    its reason are said once (rank 0). Other policies pass through."""
    import copy

    import torch

    from ..parallel.distributed import dist_env
    from ..parallel.ds_config import resolve_ds_config, zero_stage

    if cfg.model.memory_policy != "auto":
        return cfg
    info = dist_env()
    cfg = copy.deepcopy(cfg)
    if not torch.cuda.is_available():
        choice, why = "reversible", "no GPU memory to plan against (CPU): reversible columns"
    else:
        stages = cfg.pipeline.stages
        replicas = info.world_size // stages
        micro = cfg.pipeline.micro_batches if stages > 1 else cfg.train.grad_accum
        ds = resolve_ds_config(ds_config, cfg, info.world_size) if ds_config is not None else None
        props = torch.cuda.get_device_properties(info.local_rank % torch.cuda.device_count())
        args = {k: v for k, v in cfg.model.args.items() if k not in ("num_classes", "reversible", "inter_supv")}
        inp = PlanInput(model=cfg.model.name, nodes=1, gpus_per_node=info.world_size, gpu_mem_gib=props.total_memory / GIB,
                        zero=zero_stage(ds) if ds is not None else 0, pipeline=stages,
                        batch=max(cfg.train.batch_size // replicas // micro, 1), res=cfg.data.img_size,
                        precision="bf16" if cfg.train.precision in ("bf16", "fp16") else "fp32",
                        num_classes=cfg.model.args.get("num_classes", 1000),
                        inter_supv=cfg.model.args.get("inter_supv", True), model_args=args)
        choice, why = choose_memory_policy(inp)
    cfg.model.memory_policy = choice
    if info.is_main:
        say(f"model.memory_policy=auto: {choice} ({why})")
    return cfg
