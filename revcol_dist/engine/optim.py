"""Optimizer parameter groups: weight decay off for 1-D tensors, layer-wise LR decay.

Layer ids follow the published rule, on the released key names: the stem is 0; block b of
column j (b counted over the whole column) is b + j + 1; the fusion of level l is
sum(layers[:l]) + j + 1; alpha of column j is j + 1; heads and decoders are num_layers =
sum(layers) + num_columns. A group's LR is lr * layer_decay ** (num_layers - id).
(The published code reads only the last digit of ``subnet{j}``, which mis-assigns columns >= 10
of RevCol-B; here the whole index counts.)
"""

from __future__ import annotations

import re
from functools import partial
from typing import Collection, Dict, List, Optional, Sequence

import torch

from ..models.official import to_official_key

_SUBNET = re.compile(r"^subnet(\d+)\.(alpha\d+|level(\d+)\.(blocks\.(\d+)|fusion)\.)")


def num_layers(layers: Sequence[int], num_columns: int) -> int:
    return sum(layers) + num_columns


def layer_id(official_name: str, layers: Sequence[int], num_columns: int) -> int:
    if official_name.startswith("stem."):
        return 0
    m = _SUBNET.match(official_name)
    if m is None:  # classifier heads, decoders
        return num_layers(layers, num_columns)
    column = int(m.group(1))
    if m.group(2).startswith("alpha"):
        return column + 1
    level = int(m.group(3))
    if m.group(5) is not None:
        block = sum(layers[:level]) + min(int(m.group(5)), layers[level] - 1)
    else:
        block = sum(layers[:level])
    return block + column + 1


def _ndim(p: torch.Tensor) -> int:
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim  # ZeRO-3 partitions are flat


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 names: Optional[Collection[str]] = None) -> List[Dict]:
    """One group per (layer id, decay or not), each with ``lr_scale``; empty groups are dropped.
    ``names``: only these parameters (a ZeRO shard's), grouped as in the whole model."""
    cfg = model.config
    top = num_layers(cfg.layers, cfg.num_columns)
    groups: Dict[tuple, Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or (names is not None and name not in names):
            continue
        lid = layer_id(to_official_key(name, cfg.inter_supv), cfg.layers, cfg.num_columns) if layer_decay != 1.0 else top
        decay = _ndim(p) > 1
        key = (lid, decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": layer_decay ** (top - lid), "layer_id": lid}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def make_optimizer(model: torch.nn.Module, name: str, weight_decay: float, layer_decay: float = 1.0,
                   cpu_adam: bool = False, names: Optional[Collection[str]] = None, fused: bool = True):
    """AdamW (betas 0.9/0.999, eps 1e-8) or SGD (momentum 0.9) over ``param_groups``; the
    backends set each group's LR every step (``lr * lr_scale``).

    ``fused``: torch's fused kernels (CUDA and CPU), one multi-tensor kernel per parameter
    group, its step counts on the device (no host read), and ``found_inf`` honoured in the
    kernel (GradScaler). torch's default elsewhere would be ~10 kernels per parameter on a CPU
    and a dozen multi-tensor passes on a GPU (``benchmarks/ops_per_step.py``).
    ``cpu_adam``: DeepSpeed's vectorised CPU Adam (the same AdamW update), for ZeRO-Offload
    on GPU nodes, where torch's AdamW would step the host-resident states several times
    slower. It compiles on first use, so CPU-only runs (and CI) keep torch's."""
    groups = param_groups(model, weight_decay, layer_decay, names)
    for g in groups:
        g.pop("names")
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adamw_mode=True)
    kind = {"sgd": partial(torch.optim.SGD, momentum=0.9),
            "adamw": partial(torch.optim.AdamW, betas=(0.9, 0.999), eps=1e-8)}[name]
    fused = fused and all(_fusable(p) for g in groups for p in g["params"])
    return kind(groups, lr=0.0, fused=fused or None)


def _fusable(p: torch.Tensor) -> bool:
    """A tensor torch's fused optimizers take (floating point, on a device they support)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return p.is_floating_point() and p.device.type in _get_fused_kernels_supported_devices()


def wants_cpu_adam(optimizer: str, ds_config, device: torch.device) -> bool:
    """AdamW whose states DeepSpeed keeps on the host (ZeRO-Offload to CPU or NVMe), on a GPU."""
    offload = (ds_config or {}).get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
    return optimizer == "adamw" and torch.device(device).type == "cuda" and offload in ("cpu", "nvme")
