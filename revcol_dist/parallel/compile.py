"""Compiled ConvNeXt blocks, fusions and decoders (``train.compile``), applied from outside the model.

Compiling each block module on its own measured slower on the H200 than eager (286 against
240 ms per RevCol-B step): a compiled call per module costs host time of its own, and graphs
guarded on module identity recompile per block. Here the compiled unit is a block's lean
forward and its hand-written backward written as functions of tensors
(``reversible/block_kernels.py``): graphs guarded on shapes and dtypes, one per level and
variant (drop path on or off, h kept or not), each serving every block and column of its
level. The reversible recomputation calls the very graph the forward called, so the level it
recomputes is bitwise the forward's and reconstruction stays exact.

The fusions (``reversible/fusion_kernels.py``) compile as one function too: the engine calls
it itself in the reversible levels; elsewhere (plain columns, evaluation, ``memory_policy:
plain``) each ``Fusion`` module's ``forward`` is pointed at it (an instance attribute, so that a
deep copy, the EMA's, points at its own copy's tensors).

The decoders of intermediate supervision (``decoder_kernels.py``) likewise: each stage and the
output as one compiled function, pointed at by the ``Decoder``'s ``stage`` and ``output``;
a checkpointed stage recomputes through the same graph.

Under autocast every graph here takes its conv and matmul weights already in the compute dtype,
cast once per step, not inside each call (the forward, the recomputation and the backward would
each cast them again, on a GPU a kernel per weight): the blocks' and the reversible levels'
fusions' from the engine's one buffer (``lean_block.cast_weights``), the decoders' and a plain
forward's fusions' from one autograd node made when the model's forward starts
(``step_casts``).

Where blocks do not run through the lean functions (ZeRO-3's partitioned parameters, the
memory-first ``recompute: block`` mode), they stay eager: the switch changes speed, never what
is computed beyond rounding.
"""

from __future__ import annotations

import weakref
from functools import partial
from types import MethodType
from typing import Dict, Optional, Union, Tuple

import torch

from ..models.column import Fusion
from ..models.heads import Decoder

from ..reversible import block_kernels, coupling, fusion_kernels, lean_block
from . import decoder_kernels, step_casts

# Graphs per compiled function: 4 levels x (drop path on/off) x (training, evaluation) x
# (h kept, recomputed) x (a level's coupling in its last block or not) and precision changes
# stay below this.
RECOMPILE_LIMIT = 128

# Inductor's options for every graph here. Layout optimisation forced: a graph with a depthwise
# convolution's backward but no forward convolution (a block's backward) otherwise leaves it off,
# and torch 2.13 then realises the convolution's input and gradient in NCHW for cuDNN: two
# transposing copies per block backward and a transposed residual add, where the maps arrive
# channels-last (benchmarks/triton_codegen.py reads it off the generated code). Stride padding
# off: a fusion's LayerNorm backward wrote its gradient with each image row padded to 128 bytes
# (RevCol-B's 28 x 72 channels: 2,016 -> 2,048 elements), and the Linear's matmul behind it then
# needed a contiguous copy of that gradient, a kernel per up part's backward.
INDUCTOR_OPTIONS = {"force_layout_optimization": True, "comprehensive_padding": False}

# ``train.compile_combo`` (default off until a GPU run compares its values and times it):
# independent pointwise kernels of a graph launched as one
# (inductor's combo kernels, pointwise only: the same arithmetic, so the same values), such as
# the small casts of weight gradients and the finishing passes beside them. Every kernel of a
# RevCol-B and -T step compiles for sm_90 with them, none spilling registers
# (benchmarks/triton_codegen.py --cubin); combining the reductions too spilled.
COMBO_OPTIONS = {"combo_kernels": True, "combo_kernels_pointwise_only": True}

# ``train.compile_autotune``: inductor's matmul search. Each matmul (and convolution) is timed on
# the device at compile time as cuBLAS/cuDNN against Triton templates with their pointwise
# neighbours fused in as epilogues (GELU into pwconv1, layer scale and the residual into
# pwconv2), and the faster kept. At RevCol's narrow levels the pwconv matmuls are bound by
# memory (~0.8*C FLOP per byte); generated as templates, a RevCol-B step's compiled graphs move
# 0.82x the bytes in 0.91x the launches (benchmarks/triton_codegen.py --matmuls triton: every
# template taken). What the timing decides needs a GPU; the first steps wait minutes for it.
AUTOTUNE_OPTIONS = {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"}

Choice = Tuple[bool, bool]  # (train.compile_autotune, train.compile_combo)
_COMPILED: Dict[Choice, lean_block.Kernels] = {}
_DECODER: Dict[Choice, tuple] = {}
_CHOICE: Choice = (False, False)  # apply_compile's, read by the decoders' compiled stages when called


def inductor_options(autotune: bool = False, combo: bool = False) -> dict:
    """The options every graph here compiles with."""
    return {**INDUCTOR_OPTIONS, **(AUTOTUNE_OPTIONS if autotune else {}), **(COMBO_OPTIONS if combo else {})}


def _choice(autotune: Optional[bool], combo: Optional[bool]) -> Choice:
    return (_CHOICE[0] if autotune is None else bool(autotune), _CHOICE[1] if combo is None else bool(combo))


def wants_compile(setting: Union[str, bool], device: torch.device) -> bool:
    """``train.compile``: auto compiles on CUDA devices only (on a CPU the first step would
    wait minutes for C++ compilation that a short CPU run never earns back)."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return bool(setting)


def compiled_kernels(autotune: Optional[bool] = None, combo: Optional[bool] = None) -> lean_block.Kernels:
    """The block kernels under ``torch.compile`` (built once per process and choice of
    ``autotune`` and ``combo``, by default apply_compile's; graphs compile on first use, per shape)."""
    key = _choice(autotune, combo)
    if key not in _COMPILED:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        compile_ = partial(torch.compile, dynamic=False, fullgraph=True, options=inductor_options(*key))
        _COMPILED[key] = lean_block.Kernels(*(compile_(f) for f in (
            block_kernels.forward_full, block_kernels.hidden, block_kernels.tail_grads, block_kernels.body_grads,
            fusion_kernels.fusion_forward, coupling.shortcut_backward, block_kernels.block_grads)), couples=not key[0])
    return _COMPILED[key]


def compiled_decoder(autotune: Optional[bool] = None, combo: Optional[bool] = None) -> tuple:
    """(stage, output) of ``decoder_kernels`` under ``torch.compile``, built once per process
    and choice of ``autotune`` and ``combo`` (by default apply_compile's)."""
    key = _choice(autotune, combo)
    if key not in _DECODER:
        compile_ = partial(torch.compile, dynamic=False, fullgraph=True, options=inductor_options(*key))
        _DECODER[key] = (compile_(decoder_kernels.stage_forward), compile_(decoder_kernels.output_forward))
    return _DECODER[key]


def _compiled_stage(self: Decoder, i: int, x: torch.Tensor, size) -> torch.Tensor:
    """``Decoder.stage`` through the compiled stage function."""
    args = lean_block.swapped(decoder_kernels.stage_arguments(self, i), step_casts.casts_of(self))
    return compiled_decoder()[0](x, decoder_kernels.sizes(size), *args, decoder_kernels.stage_index(x, size))


def _compiled_output(self: Decoder, x: torch.Tensor, image_size) -> torch.Tensor:
    """``Decoder.output`` through the compiled output function."""
    args = lean_block.swapped(decoder_kernels.output_arguments(self), step_casts.casts_of(self))
    return compiled_decoder()[1](x, decoder_kernels.sizes(image_size), *args)


def _set_decoders(model: torch.nn.Module, compiled: bool) -> None:
    for m in model.modules():
        if isinstance(m, Decoder):
            for name, fn in (("stage", _compiled_stage), ("output", _compiled_output)):
                if compiled and decoder_kernels.fits(m):
                    setattr(m, name, MethodType(fn, m))
                elif name in m.__dict__:
                    delattr(m, name)  # the class's own again
            if not compiled:
                step_casts.drop([m])


def compile_loss(loss_fn, setting: Union[str, bool], device: torch.device) -> None:
    """``RevColLoss``'s arithmetic (its ``terms``: casts, cross-entropies, the reconstruction
    target and BCEs, the weighted sum) as one compiled graph per head layout and target kind
    (eager: ~80 kernels for RevCol-B's four heads), or back to eager where not compiled."""
    eager = loss_fn.eager_terms
    loss_fn.terms = torch.compile(eager, dynamic=False, fullgraph=True) if wants_compile(setting, device) else eager


def _plain_runner(keep_hidden: bool):
    """A block outside the reversible engine: lean (compiled forward, hand-written backward)
    under autograd, the compiled forward alone without it; weights from the forward's casts.
    One autograd node per block, its backward one graph: a plain forward is the policy for
    memory to spare. A level's last block also computes the level's coupling (``couple``):
    forward and gradients in the block's own graphs."""
    def run(block, y, couple=None):
        with lean_block.weight_casts(_FORWARD_CASTS):
            if torch.is_grad_enabled():
                return lean_block.lean_block(block, y, keep_hidden=keep_hidden, one_node=True, couple=couple)
            return lean_block.forward(block, y, couple=couple)[0]
    run.couples = True  # a level's last block takes its coupling (``Column.forward``)
    return run


_FORWARD_CASTS: Optional[dict] = None  # the plain training forward's weight casts, while it runs
_CAST_HOOKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _column_blocks(model: torch.nn.Module) -> list:
    return [b for col in model.columns for l in range(4) for b in getattr(col, f"level{l}").blocks]


def _autograd_cast_groups(model: torch.nn.Module, plain: bool) -> list:
    """The compiled functions that run under ordinary autograd, in groups that share a cast node
    (``step_casts``), each a list of (module, tensors autocast would cast): each decoder, and in
    a plain forward each column's fusions (the reversible engine casts its levels' own)."""
    groups = [[(m, decoder_kernels.cast_targets(m))] for m in model.modules()
              if isinstance(m, Decoder) and "stage" in m.__dict__]
    if plain:
        for col in getattr(model, "columns", ()):
            fusions = [getattr(col, f"level{l}").fusion for l in range(4)]
            groups.append([(f, fusion_kernels.cast_targets(f)) for f in fusions if "forward" in f.__dict__])
    return groups


def _cast_before_forward(model: torch.nn.Module, args) -> None:
    """A training forward under autocast: the decoders' conv and matmul weights (and in a
    plain forward, ``memory_policy: plain``, the fusions') to be cast once per group, each group
    as one autograd node (``step_casts``); in a plain forward every column block's weights too,
    for the forward and (held by each block's node) its backward. The reversible engine casts
    its own levels'."""
    global _FORWARD_CASTS
    x = args[0] if args else None
    _FORWARD_CASTS = None
    if not torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return
    dtype = torch.get_autocast_dtype(x.device.type)
    plain = not getattr(model, "reversible", True)
    step_casts.drop([m for m in model.modules() if isinstance(m, (Fusion, Decoder))])  # an earlier forward's
    step_casts.register(_autograd_cast_groups(model, plain), dtype)
    if plain:
        _FORWARD_CASTS = {}
        lean_block.cast_weights(_FORWARD_CASTS, _column_blocks(model), dtype)


def _cast_after_forward(model: torch.nn.Module, args, output) -> None:
    global _FORWARD_CASTS
    _FORWARD_CASTS = None  # the blocks' backward nodes hold what they need


def _set_cast_hooks(model: torch.nn.Module, on: bool) -> None:
    for handle in _CAST_HOOKS.pop(model, ()):
        handle.remove()
    if on and hasattr(model, "columns"):
        _CAST_HOOKS[model] = (model.register_forward_pre_hook(_cast_before_forward),
                              model.register_forward_hook(_cast_after_forward))


def _compiled_fusion_forward(self: Fusion, down_in, up_in=None, up2_in=None):
    """``Fusion.forward`` through the compiled fusion function."""
    args = fusion_kernels.fusion_arguments(self, down_in, up_in, up2_in)
    return lean_block.kernels().fusion(down_in, up_in, up2_in, *lean_block.swapped(args, step_casts.casts_of(self)))


def _set_fusions(model: torch.nn.Module, compiled: bool) -> None:
    for m in model.modules():
        if isinstance(m, Fusion):
            if compiled and fusion_kernels.fits(m):
                m.forward = MethodType(_compiled_fusion_forward, m)
            elif "forward" in m.__dict__:
                del m.forward  # the class's own again
            if not compiled:
                step_casts.drop([m])


def _partitioned(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def apply_compile(model: torch.nn.Module, setting: Union[str, bool], device: torch.device,
                  autotune: bool = False, combo: bool = False) -> Optional[str]:
    """Switch the process's lean blocks to compiled kernels where ``setting`` asks for it (and
    back to eager where not), with inductor's matmul search where ``autotune``
    (``train.compile_autotune``), pointwise kernels combined where ``combo``
    (``train.compile_combo``); returns a line for the log, or None when nothing is compiled."""
    global _CHOICE
    if not wants_compile(setting, device):
        lean_block.use_kernels(None)
        _set_fusions(model, False)
        _set_decoders(model, False)
        if hasattr(model, "block_runner"):
            model.block_runner = None
        _set_cast_hooks(model, False)
        return ("train.compile_autotune: ignored, nothing is compiled here (train.compile is "
                f"{setting!r} on {torch.device(device).type}); set train.compile=true to use it") if autotune else None
    if _partitioned(model):
        lean_block.use_kernels(None)
        return ("train.compile: not applied under ZeRO-3 (its partitioned parameters run the blocks' own "
                "forward under DeepSpeed's hooks); blocks run eagerly, the loss is still compiled"
                + (" (train.compile_autotune with it)" if autotune else ""))
    _CHOICE = (bool(autotune), bool(combo))
    lean_block.use_kernels(compiled_kernels())
    _set_fusions(model, True)
    _set_decoders(model, True)
    policy = getattr(model, "policy", None)
    if hasattr(model, "block_runner"):
        hidden_recomputed = set(policy.recompute_hidden) if policy is not None else set()
        model.block_runner = [_plain_runner(keep_hidden=l not in hidden_recomputed) for l in range(4)]
        _set_cast_hooks(model, True)
    mode = "" if policy is None or policy.recompute == "level" else (
        " (recompute: block: the reversible columns' blocks stay eager, their chunked recomputation is not compiled)")
    search = (", each matmul timed against Triton templates with their neighbours fused (train.compile_autotune: "
              "the first steps wait minutes longer)") if autotune else ""
    search += ", independent pointwise kernels launched as one (train.compile_combo)" if combo else ""
    return ("train.compile: ConvNeXt blocks, fusions and decoders run as compiled graphs (forward, recomputation and "
            "backward; the first steps wait for compilation" + search + ")" + mode)
