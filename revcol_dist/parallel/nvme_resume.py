"""Completes DeepSpeed's ZeRO-3 load when the optimizer is offloaded to NVMe.

DeepSpeed (0.19) then restores only what lives in the swap files (copied back from the
checkpoint's ``offloaded_tensors/``) and skips the ZeRO checkpoint itself. Optimizer
sub-groups too small to be worth swapping stay in host memory and are saved in that
checkpoint, so on resume they kept their freshly initialised values: master weights and Adam
moments of (typically) every bias, norm and layer scale, and Adam's step counter everywhere.
Measured here: all 81 small parameters of a RevCol came back at their initial values. This
puts them back from the rank's own ``*_optim_states.pt``."""

from __future__ import annotations

from pathlib import Path

import torch


def offloads_optimizer_to_nvme(engine) -> bool:
    return engine.zero_optimization_partition_weights() and engine.zero_nvme_offload_optimizer()


def prime_optimizer_state(engine) -> None:
    """Adam creates its moments at the first step; until then the NVMe swapper does not know
    them, and the first resumed step would start them from zero and overwrite the swap files
    just copied back. One step at learning rate 0 on zero gradients creates them (weights,
    including weight decay, unchanged); the load then fills them."""
    opt = engine.optimizer
    saved_lrs = [g["lr"] for g in opt.optimizer.param_groups]
    for g in opt.optimizer.param_groups:
        g["lr"] = 0.0
    timers = set()
    for i, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
        swappable = opt._swappable_optimizer_subgroup(i)
        if swappable:
            opt._optimizer_states_and_gradient_swap_in(i, timers)
        kept = fp32.grad  # resident sub-groups keep a gradient buffer across steps
        fp32.grad = kept.zero_() if kept is not None else torch.zeros_like(fp32)
        opt._optimizer_step(i)
        fp32.grad = kept
        if swappable:
            opt._optimizer_states_and_gradient_swap_out(i, timers)
    for g, lr in zip(opt.optimizer.param_groups, saved_lrs):
        g["lr"] = lr


def _state_order(opt):
    """Sub-group ids in the order of the saved optimizer state (DeepSpeed lists each param
    group's sub-groups in turn before calling state_dict)."""
    order = []
    for gid in range(len(opt.optimizer.param_groups)):
        order += [i for i in range(len(opt.fp32_partitioned_groups_flat)) if opt.sub_group_to_group_id[i] == gid]
    return order


def restore_resident_state(engine, directory: Path) -> int:
    """After DeepSpeed's own load (and prime_optimizer_state before it). Returns how many
    optimizer sub-groups were restored from host-memory state."""
    opt = engine.optimizer
    path = engine._get_zero_ckpt_name(str(directory.parent), directory.name)
    saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    flats = saved["fp32_flat_groups"]
    states = saved["optimizer_state_dict"]["state"]
    if len(flats) != len(opt.fp32_partitioned_groups_flat):
        raise RuntimeError(f"{path} has {len(flats)} optimizer sub-groups, this model {len(opt.fp32_partitioned_groups_flat)}: "
                           f"resume with the same model, optimizer groups and DeepSpeed config")
    opt.checkpoint_event_prologue()  # release the whole copies of small parameters
    restored = 0
    for index, i in enumerate(_state_order(opt)):
        fp32 = opt.fp32_partitioned_groups_flat[i]
        live, kept = opt.optimizer.state[fp32], states.get(index, {})
        if "step" in kept:  # a scalar: never swapped, so lost on every sub-group
            live["step"] = kept["step"].clone() if torch.is_tensor(kept["step"]) else kept["step"]
        if opt._swappable_optimizer_subgroup(i):
            continue  # master weights and moments came back from the swap files
        if flats[i].numel() != fp32.numel():
            raise RuntimeError(f"{path}: sub-group {i} holds {flats[i].numel()} elements, this rank "
                               f"{fp32.numel()}: resume with the same world size and DeepSpeed config")
        fp32.data.copy_(flats[i])
        for key, value in kept.items():
            if key != "step" and torch.is_tensor(value):
                live[key].copy_(value)
        opt._reassign_or_swap_out_partitioned_parameters(i)  # master -> working copy
        restored += 1
    opt.loss_scaler = saved["loss_scaler"]
    opt.dynamic_loss_scale = saved["dynamic_loss_scale"]
    opt.overflow = saved["overflow"]
    opt.checkpoint_event_epilogue()  # gather the small parameters whole again, now restored
    return restored
