"""Compiled ConvNeXt blocks (``train.compile``), applied from outside the model.

Compiling each block module on its own measured slower on the H200 than eager (286 against
240 ms per RevCol-B step): a compiled call per module costs host time of its own, and graphs
guarded on module identity recompile per block. Here the compiled unit is a block's lean
forward and its hand-written backward written as functions of tensors
(``reversible/block_kernels.py``): graphs guarded on shapes and dtypes, one per level and
variant (drop path on or off, h kept or not), each serving every block and column of its
level. The reversible recomputation calls the very graph the forward called, so the level it
recomputes is bitwise the forward's and reconstruction stays exact.

Where blocks do not run through the lean functions (ZeRO-3's partitioned parameters, the
memory-first ``recompute: block`` mode), they stay eager: the switch changes speed, never what
is computed beyond rounding.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Union

import torch

from ..reversible import block_kernels, fusion_kernels, lean_block

# Graphs per compiled function: 4 levels x (drop path on/off) x (training, evaluation) x
# (h kept, recomputed) and precision changes stay well below this.
RECOMPILE_LIMIT = 64

_COMPILED: Optional[lean_block.Kernels] = None


def wants_compile(setting: Union[str, bool], device: torch.device) -> bool:
    """``train.compile``: auto compiles on CUDA devices only (on a CPU the first step would
    wait minutes for C++ compilation that a short CPU run never earns back)."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return bool(setting)


def compiled_kernels() -> lean_block.Kernels:
    """The block kernels under ``torch.compile`` (built once per process; graphs compile on
    first use, per shape)."""
    global _COMPILED
    if _COMPILED is None:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        compile_ = partial(torch.compile, dynamic=False, fullgraph=True)
        _COMPILED = lean_block.Kernels(*(compile_(f) for f in (
            block_kernels.forward_full, block_kernels.hidden, block_kernels.tail_grads, block_kernels.body_grads,
            fusion_kernels.fusion_forward)))
    return _COMPILED


def _plain_runner(keep_hidden: bool):
    """A block outside the reversible engine: lean (compiled forward, hand-written backward)
    under autograd, the compiled forward alone without it."""
    def run(block, y):
        if torch.is_grad_enabled():
            return lean_block.lean_block(block, y, keep_hidden=keep_hidden)
        return lean_block.forward(block, y)[0]
    return run


def _partitioned(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def apply_compile(model: torch.nn.Module, setting: Union[str, bool], device: torch.device) -> Optional[str]:
    """Switch the process's lean blocks to compiled kernels where ``setting`` asks for it (and
    back to eager where not); returns a line for the log, or None when nothing is compiled."""
    if not wants_compile(setting, device):
        lean_block.use_kernels(None)
        if hasattr(model, "block_runner"):
            model.block_runner = None
        return None
    if _partitioned(model):
        lean_block.use_kernels(None)
        return ("train.compile: not applied under ZeRO-3 (its partitioned parameters run the blocks' own "
                "forward under DeepSpeed's hooks); blocks run eagerly")
    lean_block.use_kernels(compiled_kernels())
    policy = getattr(model, "policy", None)
    if hasattr(model, "block_runner"):
        hidden_recomputed = set(policy.recompute_hidden) if policy is not None else set()
        model.block_runner = [_plain_runner(keep_hidden=l not in hidden_recomputed) for l in range(4)]
    mode = "" if policy is None or policy.recompute == "level" else (
        " (recompute: block keeps its reversible columns eager: their chunked recomputation is not compiled)")
    return ("train.compile: ConvNeXt blocks run as compiled graphs (forward, recomputation and backward; "
            "the first steps wait for compilation)" + mode)
