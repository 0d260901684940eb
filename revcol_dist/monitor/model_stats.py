"""Statistics of the model worth watching: the reversible coupling weights alpha."""

from __future__ import annotations

from typing import Dict

import torch


@torch.no_grad()
def alpha_stats(model: torch.nn.Module) -> Dict[str, float]:
    """``model/alpha_{col}_{level}/mean`` and ``/min`` of |alpha| (the clamp acts on |alpha|).

    Under ZeRO-3 the alphas are gathered (collective: call on every rank); a pipeline stage
    reports its own columns."""
    named = [(n, p) for n, p in model.named_parameters() if ".alpha" in n and n.startswith("columns.")]
    params = [p for _, p in named]
    gather = None
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    out: Dict[str, float] = {}
    if gather is not None:
        gather.__enter__()
    try:
        for name, p in named:
            if p.numel() == 0:  # a pipeline stage holds only its own columns
                continue
            col = int(name.split(".")[1])
            level = int(name.rsplit("alpha", 1)[1])
            a = p.detach().float().abs()
            out[f"model/alpha_{col}_{level}/mean"] = float(a.mean())
            out[f"model/alpha_{col}_{level}/min"] = float(a.min())
    finally:
        if gather is not None:
            gather.__exit__(None, None, None)
    return out
