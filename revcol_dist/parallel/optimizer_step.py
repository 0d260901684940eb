"""The optimizer step with its skip decided on the device: no host read of the step's gradients."""

from __future__ import annotations

import torch


@torch.no_grad()
def fused_adamw_step(optimizer: torch.optim.AdamW, found_inf: torch.Tensor) -> None:
    """One step of torch's fused AdamW kernel over every group, skipped on the device where
    ``found_inf`` (a 0-d float tensor on the parameters' device) is 1: weights, moments and
    step counts then stay as they were. Every group's step counts advance by 1 - found_inf in
    one multi-tensor op; torch's own ``found_inf`` path (``optimizer.found_inf``, as GradScaler
    sets it) adds and takes back per group, two more kernels per layer-decay group (48 in
    RevCol-B). The optimizer stays torch's (DeepSpeed and checkpoints see no other type);
    its step hooks do not run here."""
    work = []
    for group in optimizer.param_groups:
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        optimizer._init_group(group, params_with_grad=params, grads=grads, exp_avgs=exp_avgs,
                              exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs, state_steps=steps)
        if params:
            work.append((group, (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)))
    if not work:
        return
    steps = [s for _, tensors in work for s in tensors[5]]
    advance = 1.0 - found_inf  # as a list of 0-d tensors: read on the device (one tensor is read on the host on a CPU)
    torch._foreach_add_(steps, [advance] * len(steps))
    for group, tensors in work:
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(*tensors, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                            eps=group["eps"], amsgrad=group["amsgrad"], maximize=group["maximize"], grad_scale=None,
                            found_inf=found_inf)


def skips_in_kernel(optimizer: torch.optim.Optimizer) -> bool:
    """Torch's fused AdamW (``fused_adamw_step``). Not fused SGD: its first step skipped would
    leave the momentum buffers it made uninitialised."""
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))
