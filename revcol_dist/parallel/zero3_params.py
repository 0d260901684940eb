"""ZeRO-3 parameters without a collective per parameter: initial weights written into each
rank's partition locally, persistent parameters gathered in one collective per step.

Initial weights. The keyed initialisation (``models/init.py``) gives every rank the same values,
so nothing needs to travel: ``local_partitions`` gives each module's parameters whole storage,
lets the initialisation write them, and keeps this rank's slice of each (DeepSpeed's layout:
the flattened parameter, padded, in equal consecutive slices by rank). DeepSpeed's
``GatheredParameters(modifier_rank=0)`` gathered, then broadcast each parameter: 304 broadcasts
and 5.4 s of the main job's start under ZeRO-3 x2 on gloo (cProfile, rank 0).

Persistent parameters. DeepSpeed keeps parameters below ``stage3_param_persistence_threshold`` (1e5 elements by
default) whole on every rank. After each optimizer step it gathers them again from their
updated partitions, one all-gather per parameter (``DeepSpeedZeroOptimizer_Stage3._post_step``,
DeepSpeed 0.19). RevCol has hundreds of such parameters: LayerNorms, biases, layer scales,
alphas and every weight of a small model (all 313 of the main job's). Measured with cProfile on
rank 0 of the main job under ZeRO-3 x2 on gloo, those gathers took 0.22 s of a 0.76 s step; on
NCCL they are hundreds of launches per step.

``coalesce_persistent_gather`` runs one flat all-gather of every rank's partitions (per dtype
and process group), copies each parameter out of it, and marks it available, just before
DeepSpeed's own gather, which then finds nothing left to do. Same bytes, same values (tested
bitwise against DeepSpeed's own gather).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Sequence, Tuple

import torch

from . import comm


@contextmanager
def local_partitions(params: Sequence[torch.nn.Parameter]):
    """ZeRO-3 parameters made whole (uninitialised) for the block, then this rank's slice of
    each written to its partition: for code that writes every element (an initialisation) and
    computes the same values on every rank. No collective. Partitions not in memory (NVMe
    offload swaps them out) go through DeepSpeed's gather and rank 0's broadcast instead."""
    if not _coalescible(params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0):
            yield
        return
    held = [(p, p.data) for p in params]
    for p in params:
        p.data = torch.empty(p.ds_shape, dtype=p.ds_tensor.dtype, device=p.ds_tensor.device)
    try:
        yield
        rank = comm.rank(params[0].ds_process_group) if params else 0
        for p in params:
            size = p.ds_tensor.ds_numel
            flat = p.data.reshape(-1)[rank * size:(rank + 1) * size]
            p.ds_tensor.data[:flat.numel()].copy_(flat)
    finally:
        for p, data in held:
            p.data = data


def _coalescible(params: Sequence[torch.nn.Parameter]) -> bool:
    """Plain partitions only: no ZeRO++ secondary (hpZ) copies, no quantized weights, every
    partition in memory (not swapped out to NVMe)."""
    for p in params:
        t = getattr(p, "ds_tensor", None)
        if t is None or getattr(p, "ds_secondary_tensor", None) is not None or hasattr(t, "ds_quant_scale"):
            return False
        if t.dim() == 0 or t.numel() != t.ds_numel:  # a swapped-out partition keeps an empty tensor
            return False
    return True


def gather_persistent(params: Sequence[torch.nn.Parameter]) -> int:
    """Gather the given ZeRO-3 parameters that are not available, one collective per (dtype,
    process group); returns how many collectives ran."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not todo or not _coalescible(todo):
        return 0
    groups: Dict[Tuple[torch.dtype, int], List[torch.nn.Parameter]] = {}
    for p in todo:
        groups.setdefault((p.ds_tensor.dtype, id(p.ds_process_group)), []).append(p)
    for ps in groups.values():
        device = ps[0].device
        local = torch.cat([p.ds_tensor.reshape(-1).to(device) for p in ps])
        table = comm.all_gather_flat(local, group=ps[0].ds_process_group).view(-1, local.numel())
        offset = 0
        for p in ps:
            n = p.ds_tensor.ds_numel
            p.data = table[:, offset:offset + n].reshape(-1)[:p.ds_numel].view(p.ds_shape)
            p.ds_status = ZeroParamStatus.AVAILABLE
            offset += n
    return len(groups)


def coalesce_persistent_gather(optimizer) -> bool:
    """Have a DeepSpeed ZeRO-3 optimizer gather its persistent parameters in one collective
    after each step. Returns False (and changes nothing) where this DeepSpeed has no such
    step hook or its parameters are not plain partitions."""
    persistent = getattr(optimizer, "persistent_parameters", None)
    post_step = getattr(optimizer, "_post_step", None)
    if not persistent or post_step is None or not _coalescible(persistent):
        return False

    def _post_step(*args, **kwargs):
        gather_persistent(optimizer.persistent_parameters)
        return post_step(*args, **kwargs)

    optimizer._post_step = _post_step
    return True
