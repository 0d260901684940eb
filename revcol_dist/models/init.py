"""Initial weights as a function of (seed, parameter name) alone.

A model's constructor draws from torch's generator, so its weights depend on what was drawn
before and on how it is built. ``initialize`` draws them again, each module from a generator
seeded by (seed, its weight's name): the same values whether the model is built whole, on the
meta device and materialised one pipeline stage at a time, or partitioned under
``deepspeed.zero.Init`` (``gather`` brings one module's parameters together at a time).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from ..randomness import param_seed

Gather = Callable[[List[nn.Parameter]], ContextManager]


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(param_seed(seed, name) & 0x7FFF_FFFF_FFFF_FFFF)


def reset_module(module: nn.Module, name: str, seed: int) -> None:
    """Re-run ``module``'s own initialisation of its direct parameters, keyed by name."""
    reset = getattr(module, "reset_parameters", None)
    if reset is None:
        raise TypeError(f"{name or 'the model'} ({type(module).__name__}) holds parameters but has no "
                        f"reset_parameters: give it one, or its weights stay undefined after a meta build")
    if "generator" in inspect.signature(reset).parameters:
        reset(generator=_generator(seed, f"{name}.weight" if name else "weight"))
    else:
        reset()  # deterministic: LayerNorm's ones and zeros, layer scales, alphas


def initialize(model: nn.Module, seed: int, modules: Optional[Iterable[nn.Module]] = None,
               gather: Optional[Gather] = None) -> None:
    """Every module of ``model`` (or of the subtrees ``modules``) with parameters of its own,
    parents first. ``gather``: a context holding one module's partitioned parameters whole
    (ZeRO-3), its changes kept."""
    chosen = None if modules is None else {id(m) for root in modules for m in root.modules()}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own or (chosen is not None and id(module) not in chosen):
            continue
        with (gather(own) if gather is not None else nullcontext()):
            reset_module(module, name, seed)


def materialize(model: nn.Module, modules: Sequence[nn.Module], seed: int, device) -> None:
    """Give the subtrees ``modules`` of a model built on the meta device storage on ``device``
    and their keyed initial weights; every other parameter becomes an empty tensor there (a
    stage's share of the model, never the whole)."""
    device = torch.device(device)
    chosen = {id(m) for root in modules for m in root.modules()}
    for module in model.modules():
        if id(module) in chosen:
            module.to_empty(device=device, recurse=False)
            continue
        for key, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[key] = nn.Parameter(torch.empty(0, dtype=p.dtype, device=device),
                                                       requires_grad=False)
        for key, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[key] = torch.empty(0, dtype=b.dtype, device=device)
    initialize(model, seed, modules)
