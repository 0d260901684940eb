"""Shared helpers for the benchmarks: one training step per execution mode, peak memory."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from revcol_dist.models import create_model

from revcol_dist.monitor.live_bytes import LiveBytes
from published_reversible import run_published

MODES = ("plain", "plain_heads_recomputed", "published", "rev_default", "rev_kN_default", "rev_k1", "rev_k2",
         "rev_k2_autograd_blocks", "rev_kN", "rev_kN_lean", "rev_kN_lean_keep3", "rev_k2_keep23", "rev_kN_block")

# Nothing kept beyond the policy's boundaries: the engine as it was before keep_levels and
# recompute_hidden became defaults (the modes below start from it unless said).
_BARE = dict(keep_levels=(), recompute_hidden=())

# Reversible policies by benchmark mode name (lean blocks unless said otherwise).
POLICIES = {
    # the variant's defaults (RevCol-T/S: k=2, last column plain, level 3 kept, level-0 hidden
    # maps recomputed); kN: the same with only the outputs kept
    "rev_default": dict(),
    "rev_kN_default": dict(boundary_interval=None),
    "rev_k1": dict(_BARE, boundary_interval=1),
    "rev_k2": dict(_BARE, boundary_interval=2),
    "rev_k2_autograd_blocks": dict(_BARE, boundary_interval=2, lean_blocks=False),
    "rev_kN": dict(_BARE, boundary_interval=None),
    "rev_kN_lean": dict(_BARE, boundary_interval=None, plain_columns=0),
    "rev_kN_lean_keep3": dict(_BARE, boundary_interval=None, plain_columns=0, keep_levels=(3,)),
    "rev_kN_block": dict(_BARE, boundary_interval=None, plain_columns=0, recompute="block"),
    "rev_k2_keep3": dict(keep_levels=(3,)),  # level 3 kept whatever the variant registers
    "rev_k2_plain0": dict(plain_columns=0),  # the variant's defaults, last column recomputed too
    # speed: levels 2-3 (60% of RevCol-T's FLOPs, 29% of its activations) kept, not recomputed
    "rev_k2_keep23": dict(_BARE, boundary_interval=2, keep_levels=(2, 3)),
    "rev_k2_fast": dict(_BARE, boundary_interval=2, plain_columns=2),
    "rev_k2_fast_keep23": dict(_BARE, boundary_interval=2, plain_columns=2, keep_levels=(2, 3)),
    # plain autograd: every activation stored, heads and decoders too
    "plain": dict(checkpoint_heads=False),
    # plain autograd for the columns, heads and decoders recomputed in backward
    "plain_heads_recomputed": dict(checkpoint_heads=True),
}


def build(name: str, mode: str, inter_supv: bool, **kw):
    """mode: plain autograd, the published per-column Function, or one of POLICIES."""
    torch.manual_seed(0)
    policy = POLICIES.get(mode, {})
    m = create_model(name, num_classes=1000, inter_supv=inter_supv, **{**policy, **kw}).train()
    m.reversible = not mode.startswith("plain")
    if mode == "published":
        m.forward_columns = lambda x, taps=(), **_: run_published(m.columns, x, taps)
    return m


def loss_fn(out, labels):
    loss = F.cross_entropy(out.logits, labels)
    for a in out.aux_logits:
        loss = loss + F.cross_entropy(a, labels)
    for r in out.reconstructions:
        loss = loss + r.square().mean()
    return loss


def step(model, x, labels) -> None:
    loss_fn(model(x), labels).backward()


def peak_step_bytes(model, x, labels) -> Dict[str, int]:
    """Peak live tensor bytes created during one forward+backward (activations, kept
    boundaries, temporaries). Gradient buffers exist beforehand, so every mode is charged
    for the same thing."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with LiveBytes() as meter:
        step(model, x, labels)
    return {"peak_bytes": int(meter.peak)}


def median_time(fn: Callable[[], None], repeats: int) -> float:
    """Median seconds of ``fn``. On a GPU the work is queued: the clock is read after the
    device has finished (synchronised before and after), not when the launches return."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
