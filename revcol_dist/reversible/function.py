"""Reversible execution of RevCol columns.

Forward runs every level without keeping its activations, as a chain of autograd nodes
wired like the network's dataflow: fusion -> block ... block -> shortcut, per (column,
level). Autograd therefore orders backward by the real dependencies, and the shortcut node
of level (j, l) finds what it needs already reconstructed by nodes that ran before it:

- its own output c_l(j): kept, or reconstructed by the shortcut node (j+1, l);
- its down input c_{l-1}(j): likewise (or the stem output x for level 0);
- its up input c_{l+1}(j-1): reconstructed by the shortcut node (j, l+1), which runs first.

The shortcut node recomputes the level (same RNG per block, same autocast), reconstructs
c_l(j-1) = (c_l(j) - L(...)) / alpha_l, and hands what it recomputed to the level's block
and fusion nodes, which backpropagate through their own part and return their parameters'
gradients (blocks by hand, see lean_block.py; or through a recomputed autograd graph with
``lean_blocks=False`` and under ZeRO-3). So parameters (alpha included) receive ordinary
returned gradients, one block at a time, as under plain autograd: hooks, DDP buckets and
``torch.autograd.grad`` see them. Levels listed in ``policy.keep_levels`` are not part of this
chain: they run with ordinary autograd and their outputs are kept.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .coupling import (clamp_alpha, clamp_alphas, coupling_operands, drift_check, shortcut, shortcut_backward,
                       with_carried)
from . import fusion_kernels, lean_block
from .host_copy import HostCopy
from .offload import Offloader
from .policy import DriftStats, ReversiblePolicy, drift_of
from .replay import AutocastState, RNGState

Key = Tuple[int, int]


class _StepState:
    """Values shared by the nodes of one forward/backward: kept maps and reconstructions."""

    def __init__(self, columns, policy: ReversiblePolicy, stats: Optional[DriftStats], x: torch.Tensor,
                 partitioned: bool) -> None:
        self.columns = columns
        self.stats = stats
        self.x = x.detach()
        self.autocast = AutocastState.capture(x.device)
        self.block_mode = policy.recompute == "block"
        # ZeRO-3 partitions parameters: they cannot be Function inputs (their recorded shape
        # is empty), so gradients are accumulated into .grad, where ZeRO's hooks pick them
        # up, exactly as under DeepSpeed's own activation checkpointing.
        self.accumulate = partitioned
        # Blocks backpropagated by hand (lean_block): parameters must be Function inputs.
        self.lean = policy.lean_blocks and not self.accumulate
        # drop path is the only randomness in a column (walking the blocks, not every module:
        # this runs every step)
        self.random = any(b.drop_path.p > 0.0 and b.drop_path.training
                          for c in columns for l in range(4) for b in getattr(c, f"level{l}").blocks)
        self.offloader = Offloader(policy.offload_boundaries, x.device)
        self.values: Dict[Key, object] = {}
        self.kept: set = set()
        self.checks: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (max |error|, max |kept|) per kept map
        self.checked = 0
        self.rng: Dict[Tuple[int, int, int], RNGState] = {}
        self.recomputes: Dict[Key, "_Recompute"] = {}
        self.fusion_needs: Dict[Key, List[bool]] = {}
        self.alphas: Dict[Key, torch.Tensor] = {}  # clamped, detached (``_alpha_pass``)
        # the blocks' weights in the compute dtype, cast once for the forward, recomputation and
        # backward of compiled blocks (``lean_block.weight_casts``), gone with the step
        self.casts: dict = {}
        # (alpha, prev) of a level whose last compiled block computes the coupling in its last
        # pass (``block_kernels.forward_full``), taken by that block; the levels it did so for
        self.couplings: Dict[Key, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.coupled: set = set()
        # (alpha, c's gradient) of column j's shortcut node, for column j-1's at the same level
        # to add alpha * g to its own gradient (``coupling.shortcut_backward``'s carried)
        self.carried: Dict[Key, Tuple[torch.Tensor, torch.Tensor]] = {}

    def replay(self, key, keep: bool = False):
        """Run a block with the RNG state its forward saw (drop path masks)."""
        state = self.rng.get(key) if keep else self.rng.pop(key, None)
        return state.restored(self.x.device) if state is not None else nullcontext()

    def keep(self, key: Key, t: torch.Tensor, offload: bool = True) -> None:
        """offload=False: t is held by an autograd graph anyway (a kept level's output)."""
        if key not in self.kept:
            self.kept.add(key)
            self.values[key] = self.offloader.stash(t.detach()) if offload else t.detach()

    def get(self, key: Key) -> torch.Tensor:
        if key not in self.values:
            raise RuntimeError(
                f"reversible engine: column {key[0]} level {key[1]} was never reconstructed. Backward through "
                "reversible columns must cover the whole graph once (no partial autograd.grad, no second backward); "
                "set model.reversible = False for that use."
            )
        v = self.values[key]
        if key not in self.kept:
            return v
        self._prefetch_column(key[0] - 1)  # the backward walks the columns down: the next it needs
        return self.offloader.fetch(v)

    def _prefetch_column(self, j: int) -> None:
        for l in range(4):
            if (j, l) in self.kept and (j, l) in self.values:
                self.offloader.prefetch(self.values[(j, l)])

    def pop(self, key: Key) -> torch.Tensor:
        v = self.get(key)
        del self.values[key]
        return v

    def reconstructed(self, key: Key, rec: torch.Tensor) -> torch.Tensor:
        """Store a reconstruction; at a kept map, measure the drift and use the kept value."""
        if key not in self.kept:
            self.values[key] = rec
            return rec
        kept = self.get(key)
        self.record_check(*drift_check(rec, kept))
        return kept

    def record_check(self, error: torch.Tensor, scale: torch.Tensor) -> None:
        """A reconstruction's drift at a kept map (``coupling.drift_check``)."""
        self.checks.append((error, scale))
        self.checked += 1
        if self.stats is not None:
            self.stats.record(self.checks, self.checked)

    @property
    def drift(self) -> Optional[torch.Tensor]:
        """The largest relative reconstruction error of the checks so far (None before any)."""
        return drift_of(self.checks) if self.checks else None


class _Recompute:
    """A level recomputed in backward, shared by its fusion, block and shortcut nodes."""

    def __init__(self, ins, ys=None, block_inputs=None, saved=None, leaves=None) -> None:
        self.ins = ins  # the level's inputs (detached, requiring grad where needed)
        self.leaves = leaves or {}  # the compiled fusion's cast weights, by id of their parameter (_fusion_leaves)
        self.ys = ys  # "level" mode: graph tensors [fusion out, block 1 out, ..., level out]
        self.block_inputs = block_inputs  # "block" mode: no-grad inputs of each block
        self.saved = saved  # "level" mode, lean blocks: what each block's hand-written backward needs


def _compiled_fusion(st: "_StepState", fusion: torch.nn.Module):
    """The compiled fusion where kernels are set and the level recomputes whole with autograd
    (level mode; not ZeRO-3), else None (the module's forward: in block mode, compiled or not,
    the forward and the recomputation both call it without autograd)."""
    k = lean_block.kernels()
    if k is None or k.fusion is None or st.accumulate or st.block_mode or not fusion_kernels.fits(fusion):
        return None
    return k.fusion


def _run_fusion(st: "_StepState", fusion: torch.nn.Module, ins: Sequence[torch.Tensor],
                leaves: Optional[dict] = None) -> torch.Tensor:
    """The fusion on the level's inputs ``ins`` (down, then up and up2 where the level has them),
    with autograd as the caller has it. Compiled: the same training graph in the forward and
    the recomputation (so the same kernels), its backward AOTAutograd's; its conv and matmul
    weights from the step's casts (``leaves``, filled where given: what its backward reaches)."""
    compiled = _compiled_fusion(st, fusion)
    if compiled is None:
        return fusion(*ins)
    up = ins[1] if fusion.up is not None else None
    up2 = ins[-1] if fusion.up2 is not None else None
    casts = _fusion_leaves(st, fusion)
    if leaves is not None:
        leaves.update(casts)
    args = fusion_kernels.fusion_arguments(fusion, ins[0], up, up2)
    return compiled(ins[0], up, up2, *lean_block.swapped(args, casts))


def _fusion_leaves(st: "_StepState", fusion: torch.nn.Module) -> dict:
    """The fusion's conv and matmul weights in the compute dtype, as fresh leaves over the
    step's one cast (``st.casts``), by id of their parameter: under autocast the compiled
    graph would cast them in every call (forward and recomputation); the backward
    differentiates for the leaves and casts those gradients to the parameters' dtype."""
    if not st.casts:
        return {}
    dtype, out = st.autocast.dtype, {}
    for p in fusion_kernels.cast_targets(fusion):
        cast = st.casts.get((id(p), dtype))
        if cast is not None:
            out[id(p)] = cast.detach().requires_grad_(p.requires_grad)
    return out


def _shortcut_backward(st: "_StepState"):
    """``coupling.shortcut_backward``, compiled where kernels are set (not under ZeRO-3)."""
    k = lean_block.kernels()
    return shortcut_backward if k is None or k.shortcut is None or st.accumulate else k.shortcut


class _Fusion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, st: _StepState, j: int, l: int, down, up, up2, *params):
        ctx.st, ctx.j, ctx.l = st, j, l
        ctx.has = (up is not None, up2 is not None)
        ctx.save_for_backward(*params)
        fusion = getattr(st.columns[j], f"level{l}").fusion
        ins = [t for t in (down, up, up2) if t is not None]
        if _compiled_fusion(st, fusion) is None:
            return fusion(*ins)
        # as the recomputation will call it: autograd on, the inputs' requires_grad as there
        ins = [t.detach().requires_grad_(n) for t, n in zip(ins, st.fusion_needs[(j, l)])]
        with torch.enable_grad():
            return _run_fusion(st, fusion, ins).detach()

    @staticmethod
    def backward(ctx, g):
        st: _StepState = ctx.st
        rec: _Recompute = st.recomputes.pop((ctx.j, ctx.l))
        fusion = getattr(st.columns[ctx.j], f"level{ctx.l}").fusion
        params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        module_params = list(fusion.parameters()) if st.accumulate else []
        has_up, has_up2 = ctx.has
        in_needs = [needs[3]] + ([needs[4]] if has_up else []) + ([needs[5]] if has_up2 else [])
        if rec.ys is not None:
            y0 = rec.ys[0]
        else:
            with torch.enable_grad(), st.autocast.context():
                y0 = fusion(*rec.ins)
        wrt_ins = [t for t, n in zip(rec.ins, in_needs) if n]
        wrt_p = [p for i, p in enumerate(params) if needs[6 + i]]
        grads = _backprop(y0, wrt_ins, [rec.leaves.get(id(p), p) for p in wrt_p], module_params, g)
        if rec.leaves:  # gradients of the cast weights, in the parameters' dtype (as autocast's casts give them)
            n = len(wrt_ins)
            grads[n:] = [gp if gp is None or gp.dtype == p.dtype else gp.to(p.dtype) for gp, p in zip(grads[n:], wrt_p)]
            lean_block.release_casts(st.casts, fusion_kernels.cast_targets(fusion), st.autocast.dtype)
        it_in, it_p = iter(grads[: len(wrt_ins)]), iter(grads[len(wrt_ins) :])
        g_ins = [next(it_in) if n else None for n in in_needs]
        g_params = [next(it_p) if needs[6 + i] else None for i in range(len(params))]
        g_up = g_ins[1] if has_up else None
        g_up2 = g_ins[-1] if has_up2 else None
        return (None, None, None, g_ins[0], g_up, g_up2, *g_params)


class _Block(torch.autograd.Function):
    @staticmethod
    def forward(ctx, st: _StepState, j: int, l: int, b: int, y, *params):
        ctx.st, ctx.j, ctx.l, ctx.b = st, j, l, b
        ctx.save_for_backward(*params)
        if st.random:
            st.rng[(j, l, b)] = RNGState.capture(st.x.device)
        blocks = getattr(st.columns[j], f"level{l}").blocks
        block = blocks[b]
        if st.lean and st.block_mode:
            return lean_block.forward_chunked(block, y)
        if st.lean and lean_block.kernels_in_use():  # the compiled graph the recomputation runs too
            couple = st.couplings.pop((j, l), None) if b == len(blocks) - 1 else None
            if couple is not None:
                st.coupled.add((j, l))
            with lean_block.weight_casts(st.casts):
                return lean_block.forward(block, y, couple=couple)[0]
        return block(y)

    @staticmethod
    def backward(ctx, g):
        st: _StepState = ctx.st
        j, l, b = ctx.j, ctx.l, ctx.b
        rec: _Recompute = st.recomputes[(j, l)]
        params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        wrt_p = [p for i, p in enumerate(params) if needs[5 + i]]
        block = getattr(st.columns[j], f"level{l}").blocks[b]
        module_params = list(block.parameters()) if st.accumulate else []
        if st.lean:
            saved, rec.saved[b] = rec.saved[b], None
            # level mode: one node for the whole block; block mode: the tail node ran first
            if st.block_mode:
                g_x, grads = lean_block.backward_body(block, saved, g)
            else:
                with lean_block.weight_casts(st.casts):
                    g_x, grads = lean_block.backward_both(block, saved, g)
                lean_block.release_casts(st.casts, lean_block.cast_targets(block), saved.cdt)
            del saved
            return (None, None, None, None, g_x, *[lean_block.like_param(gp, p) for gp, p in zip(grads, params)])
        if rec.ys is not None:  # backprop through this block's part of the recomputed graph
            y_in, y_out = rec.ys[b], rec.ys[b + 1]
            rec.ys[b + 1] = None
        else:  # recompute just this block, with grad
            y_in = rec.block_inputs[b].requires_grad_()
            rec.block_inputs[b] = None
            with torch.enable_grad(), st.autocast.context(), st.replay((j, l, b)):
                y_out = block(y_in)
        grads = _backprop(y_out, [y_in], wrt_p, module_params, g)
        del y_out
        it = iter(grads[1:])
        return (None, None, None, None, grads[0], *[next(it) if needs[5 + i] else None for i in range(len(params))])


class _BlockTail(torch.autograd.Function):
    """Identity on a block's output whose backward returns the layer-scale and pwconv2
    gradients (lean blocks): a separate node, so the block's two large weight gradients are
    never alive at once."""

    @staticmethod
    def forward(ctx, st: _StepState, j: int, l: int, b: int, y, *params):
        ctx.st, ctx.j, ctx.l, ctx.b = st, j, l, b
        ctx.save_for_backward(*params)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        st: _StepState = ctx.st
        j, l, b = ctx.j, ctx.l, ctx.b
        rec: _Recompute = st.recomputes[(j, l)]
        block = getattr(st.columns[j], f"level{l}").blocks[b]
        if rec.saved[b] is None:  # block mode: recompute from the block's input, without its MLP
            with st.autocast.context(), st.replay((j, l, b)):
                rec.saved[b] = lean_block.saved_for_vjp(block, rec.block_inputs[b])
            rec.block_inputs[b] = None
        grads = lean_block.backward_tail(block, rec.saved[b], g)
        return (None, None, None, None, g, *[lean_block.like_param(gp, p) for gp, p in zip(grads, ctx.saved_tensors)])


class _Shortcut(torch.autograd.Function):
    """c_l(j) = alpha * c_l(j-1) + f. Its backward recomputes the level, reconstructs
    c_l(j-1) from c_l(j), and leaves the recomputation to the level's block and fusion nodes."""

    @staticmethod
    def forward(ctx, st: _StepState, j: int, l: int, f, prev, alpha):
        ctx.st, ctx.j, ctx.l = st, j, l
        ctx.has_prev = prev is not None
        ctx.set_materialize_grads(False)  # c's gradient may come carried alone (``_StepState.carried``)
        if alpha is None:  # ZeRO-3: the partitioned parameter lives on the column
            alpha = getattr(st.columns[j], f"alpha{l}")
            with _gathered([alpha]):
                return shortcut(clamp_alpha(alpha), prev, f)
        ctx.save_for_backward(alpha)
        ctx.a = st.alphas[(j, l)]  # the clamped value the backward inverts with
        if (j, l) in st.coupled:  # the level's last block computed it (``_StepState.couplings``)
            st.coupled.discard((j, l))
            return f.view_as(f)
        return shortcut(ctx.a, prev, f)

    @staticmethod
    def backward(ctx, g):
        st: _StepState = ctx.st
        j, l = ctx.j, ctx.l
        col = st.columns[j]
        level = getattr(col, f"level{l}")
        alpha = ctx.saved_tensors[0] if not st.accumulate else getattr(col, f"alpha{l}")
        out = st.pop((j, l))
        vals = col.level_inputs(l, st.x, _Lookup(st, j), _Lookup(st, j - 1))
        fneeds = st.fusion_needs[(j, l)]
        ins = [v.detach().requires_grad_(n) for v, n in zip(vals, fneeds)]
        device = st.x.device
        leaves: dict = {}
        if not st.block_mode and st.lean:
            with torch.enable_grad(), st.autocast.context():
                y0 = _run_fusion(st, level.fusion, ins, leaves)
            saved, y = [], y0.detach()
            with st.autocast.context(), lean_block.weight_casts(st.casts):
                for b, block in enumerate(level.blocks):
                    with st.replay((j, l, b)):
                        y, kept = lean_block.forward(block, y, keep=True, keep_gelu=True)
                    saved.append(kept)
            f = y
            st.recomputes[(j, l)] = _Recompute(ins, ys=[y0], saved=saved, leaves=leaves)
        elif not st.block_mode:
            with torch.enable_grad(), st.autocast.context():
                ys = [_run_fusion(st, level.fusion, ins, leaves)]
                for b, block in enumerate(level.blocks):
                    with st.replay((j, l, b)):
                        ys.append(block(ys[-1]))
            f = ys[-1].detach()
            st.recomputes[(j, l)] = _Recompute(ins, ys=ys, leaves=leaves)
        else:
            block_inputs = []
            with torch.no_grad(), st.autocast.context():
                y = level.fusion(*ins)
                for b, block in enumerate(level.blocks):
                    block_inputs.append(y)
                    with st.replay((j, l, b), keep=True):
                        y = lean_block.forward_chunked(block, y) if st.lean else block(y)
            f = y
            st.recomputes[(j, l)] = _Recompute(ins, block_inputs=block_inputs,
                                               saved=[None] * len(block_inputs) if st.lean else None)
        needs = ctx.needs_input_grad
        want_alpha = alpha.requires_grad and (st.accumulate or needs[5])
        g_prev = g_alpha = None
        with _gathered([alpha] if st.accumulate else []):
            a = ctx.a if not st.accumulate else clamp_alpha(alpha.detach())
            with torch.no_grad():
                carried = st.carried.pop((j, l), None)
                if g is None and carried is None:  # nothing downstream used this map
                    g = torch.zeros_like(out)
                if ctx.has_prev:
                    key = (j - 1, l)
                    kept = st.get(key) if key in st.kept else None
                    # column j-1's node (this engine's, run after this one) adds alpha * g itself
                    defer = j >= 1 and bool(needs[4])
                    prev, g_prev, g_alpha, error, scale, g = _shortcut_backward(st)(
                        a, out, f, g, kept, bool(needs[4]) and not defer, bool(want_alpha), carried)
                    if defer:
                        st.carried[key] = (a, g)
                    if kept is None:
                        st.reconstructed(key, prev)
                    else:
                        st.record_check(error, scale)
                    if g_alpha is not None:
                        g_alpha = g_alpha.to(alpha.dtype)
                else:
                    g = with_carried(g, carried)
                    if want_alpha:
                        g_alpha = torch.zeros_like(a)
            if st.accumulate and g_alpha is not None:
                with torch.enable_grad():
                    torch.autograd.backward(clamp_alpha(alpha), g_alpha, inputs=[alpha])
                g_alpha = None
        return (None, None, None, g, g_prev, g_alpha)


class _Lookup:
    """col.level_inputs indexes maps by level; this serves them from the step state."""

    def __init__(self, st: _StepState, j: int) -> None:
        self.st, self.j = st, j

    def __getitem__(self, l: int) -> torch.Tensor:
        return self.st.get((self.j, l))


def _grad(outputs, inputs, grad_out):
    return list(torch.autograd.grad(outputs, inputs, grad_out.to(outputs.dtype), allow_unused=True)) if inputs else []


def _backprop(outputs, wrt_ins, wrt_params, module_params, grad_out):
    """Gradients of ``outputs`` for wrt_ins and wrt_params (returned). With module_params
    (ZeRO-3), those parameters' gradients are accumulated into .grad instead."""
    if not module_params:
        grads = _grad(outputs, wrt_ins + wrt_params, grad_out)
        n = len(wrt_ins)
        return grads[:n] + [lean_block.like_param(g, p) for g, p in zip(grads[n:], wrt_params)]
    for t in wrt_ins:
        t.grad = None
    trainable = [p for p in module_params if p.requires_grad]
    torch.autograd.backward(outputs, grad_out.to(outputs.dtype), inputs=wrt_ins + trainable)
    grads = [t.grad for t in wrt_ins]
    for t in wrt_ins:
        t.grad = None
    return grads


def _gathered(params):
    """DeepSpeed ZeRO-3: gather partitioned parameters for the duration of the block."""
    if params and any(hasattr(p, "ds_id") for p in params):
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # Parameters ZeRO already holds (persistent small ones, or fetched by a module) must
        # not be re-partitioned by us on exit.
        missing = [p for p in params if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
        if missing:
            return deepspeed.zero.GatheredParameters(missing)
    return nullcontext()


class _Outputs(torch.autograd.Function):
    """Joins a segment's outputs so that all of its last column's nodes run in backward
    (their reconstructions are needed) even when only some maps are used."""

    @staticmethod
    def forward(ctx, *outs):
        ctx.set_materialize_grads(True)
        return tuple(o.view_as(o) for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        return grads


def _partitioned(columns) -> bool:
    """ZeRO-3 parameters (gathered by module hooks, gradients through ZeRO's own hooks). ZeRO-3
    converts every parameter of the model, so the first one tells."""
    first = next(iter(columns[0].parameters()), None) if columns else None
    return first is not None and hasattr(first, "ds_id")


def _block_runners(policy: ReversiblePolicy) -> list:
    """How blocks with kept activations run, per level (lean; hidden map dropped on request)."""
    return [lean_block.lean_block if l not in policy.recompute_hidden
            else partial(lean_block.lean_block, keep_hidden=False) for l in range(4)]


# Where the host learns which alphas are small without waiting for the GPU: the minima of each
# forward are copied to pinned memory in the background and read by the next forward.
_LAG_MARGIN = 1.5


class AlphaMinima:
    """A segment's alpha minima on their way to the host, and the keep decisions of the forward
    that made them. Eager: ``copy``, made behind the forward. Captured into a CUDA graph:
    ``device`` only (each replay overwrites it; the graph's owner copies it out,
    ``parallel/cuda_graph.py``)."""

    def __init__(self, used: List[bool], threshold: float, copy: Optional[HostCopy] = None,
                 device: Optional[torch.Tensor] = None) -> None:
        self.used, self.threshold, self.copy, self.device = used, threshold, copy, device

    def read(self) -> List[float]:
        """The minima on the host, waiting where they are still on their way."""
        if self.copy is None:
            return self.device.tolist()  # a replay's: a sync (an eager step after replays: rare)
        return self.copy.tolist()  # long finished: made a whole step ago

    def implied(self, values: Sequence[float]) -> List[bool]:
        """The decisions ``values`` imply, with the margin for a step's lag."""
        return [v < self.threshold * _LAG_MARGIN for v in values]


def _alpha_pass(columns: Sequence[torch.nn.Module], threshold: float) -> Tuple[Dict[Key, torch.Tensor], List[List[bool]]]:
    """Every alpha of the segment clamped, and per column and level whether min |alpha_l| is
    below ``threshold`` (keep that level's input instead of reconstructing it), in one pass of
    a dozen kernels for all columns (RevCol-B: was ~600, four per clamp and two per minimum).

    The clamped values serve the forward and its backward (the parameters do not change in
    between). The minima: on a CPU, exact. On a GPU, from the previous forward's minima
    (copied to the host in the background: no sync in the step), against ``threshold`` x 1.5,
    since one optimizer step moves an alpha by far less than half; the first forward syncs once.
    Under a CUDA graph's capture the decisions are the previous (eager) forward's, and the
    minima stay on the device for the graph's owner to send (``captured_alpha_minima``)."""
    with torch.no_grad():
        raw = [getattr(col, f"alpha{l}").detach() for col in columns for l in range(4)]
        clamped = clamp_alphas(raw)
        flat = torch.cat([a.reshape(-1) for a in clamped]).abs().view(len(columns), -1)  # columns alike
        widths = [a.numel() for a in clamped[:4]]
        mins = torch.stack([part.amin(dim=1) for part in flat.split(widths, dim=1)], dim=1).reshape(-1).float()
    table = {(j, l): clamped[4 * j + l] for j in range(len(columns)) for l in range(4)}
    holder = columns[0]
    if mins.device.type != "cuda":
        flat = [v < threshold for v in mins.tolist()]
    elif torch.cuda.is_current_stream_capturing():
        previous = getattr(holder, "_revcol_alpha_mins", None)
        if previous is None or len(previous.used) != mins.numel():
            raise RuntimeError("a captured step needs an eager forward before it (its alpha decisions)")
        flat = previous.used  # what the graphs compiled in the warm-up were made for
        object.__setattr__(holder, "_revcol_alpha_mins", AlphaMinima(flat, threshold, device=mins))
    else:
        previous = getattr(holder, "_revcol_alpha_mins", None)
        if previous is None or len(previous.used) != mins.numel():
            flat = [v < threshold for v in mins.tolist()]
        else:
            flat = previous.implied(previous.read())
        minima = AlphaMinima(flat, threshold, copy=HostCopy(mins))
        object.__setattr__(holder, "_revcol_alpha_mins", minima)  # not a module attribute
    return table, [flat[4 * j : 4 * j + 4] for j in range(len(columns))]


def _minima_holders(model: torch.nn.Module) -> List[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, "_revcol_alpha_mins", None) is not None]


def captured_alpha_minima(model: torch.nn.Module) -> List[AlphaMinima]:
    """The alpha minima of each segment that the last forward left (a captured forward's are on
    the device), in module order."""
    return [h._revcol_alpha_mins for h in _minima_holders(model)]


def restore_alpha_minima(model: torch.nn.Module, minima: Sequence[AlphaMinima]) -> None:
    """Put back what ``captured_alpha_minima`` returned (after an eager forward replaced them)."""
    for h, m in zip(_minima_holders(model), minima):
        object.__setattr__(h, "_revcol_alpha_mins", m)


class Segment:
    """A pipeline stage's view of one micro-batch's reversible run (``run_reversible(...,
    segment=Segment())``). A stage that did not keep its outputs (``keep_outputs=False``) gets
    them back from the next stage, reconstructed, before its backward; after its backward it
    can read the inputs it reconstructed and send them on to the stage before."""

    def __init__(self) -> None:
        self.st: Optional[_StepState] = None
        self.last = -1

    def provide_outputs(self, values: Sequence[torch.Tensor]) -> None:
        """The outputs as the next stage reconstructed them. Where the outputs were kept
        anyway, the two are compared (drift) and the kept ones are used."""
        for l, v in enumerate(values):
            key = (self.last, l)
            if key in self.st.kept:
                self.st.reconstructed(key, v)
            else:
                self.st.values[key] = v

    def inputs_kept(self) -> set:
        """Levels of the initial state the engine keeps (small |alpha|): their storage is in use."""
        return {l for (j, l) in self.st.kept if j == -1}

    def reconstructed_inputs(self) -> List[torch.Tensor]:
        return [self.st.get((-1, l)) for l in range(4)]


def run_reversible(
    columns: Sequence[torch.nn.Module],
    x: torch.Tensor,
    taps: Sequence[int],
    policy: ReversiblePolicy,
    stats: Optional[DriftStats] = None,
    initial: Optional[Sequence[torch.Tensor]] = None,
    keep_outputs: bool = True,
    segment: Optional[Segment] = None,
) -> Tuple[List[torch.Tensor], Dict[int, torch.Tensor]]:
    """Run columns[0..n) from the stem output x reversibly; ``initial`` is the state of the
    column before the first (a pipeline stage that starts mid-network), else column 0 starts
    from nothing.

    Returns the last column's four maps and {column index: c3} for each index in ``taps``.
    """
    columns = list(columns)
    n = len(columns)
    n_plain = min(policy.plain_columns, n)
    seg = columns[: n - n_plain]
    if not keep_outputs and n_plain:
        raise ValueError("outputs handed back by a later stage must be the reversible segment's: "
                         "use policy.plain_columns=0 with keep_outputs=False")
    partitioned = _partitioned(columns)
    run_block = _block_runners(policy) if policy.lean_blocks and not partitioned else [None] * 4
    if not seg:
        state, tapped = (list(initial) if initial is not None else None), {}
        for i, col in enumerate(columns):
            state = col(x, state, run_block=run_block)
            if i in taps:
                tapped[i] = state[3]
        return state, tapped
    st = _StepState(seg, policy, stats, x, partitioned)
    k = policy.boundary_interval
    with _gathered([getattr(c, f"alpha{l}") for c in seg for l in range(4)] if st.accumulate else []):
        st.alphas, small_alpha = _alpha_pass(seg, policy.min_reconstruct_alpha)
    # Levels run with ordinary autograd in every column (their activations kept): deep levels
    # hold a large share of the FLOPs and a small share of the activations.
    plain_levels = set(policy.keep_levels) if not st.accumulate and segment is None else set()
    if st.lean and not st.block_mode and lean_block.kernels_in_use() and st.autocast.enabled:
        # every block weight, and the fusion weights of the levels this engine runs, in the
        # compute dtype at once, for the forward, recomputation and backward
        lean_block.cast_weights(st.casts, [b for c in columns for l in range(4) for b in getattr(c, f"level{l}").blocks],
                                st.autocast.dtype, [t for c in seg for l in range(4) if l not in plain_levels
                                                    for t in fusion_kernels.cast_targets(getattr(c, f"level{l}").fusion)])
    tapped: Dict[int, torch.Tensor] = {}
    prev: Optional[List[torch.Tensor]] = list(initial) if initial is not None else None
    if segment is not None:
        segment.st, segment.last = st, len(seg) - 1
    for j, col in enumerate(seg):
        last = j == len(seg) - 1
        boundary = (last and keep_outputs) or (not last and k is not None and (j + 1) % k == 0)
        cur: List[torch.Tensor] = []
        for l in range(4):
            p = None if prev is None else prev[l]
            if l in plain_levels:
                ins = col.level_inputs(l, x, cur, prev or [None] * 4)
                with lean_block.weight_casts(st.casts):
                    f = col.level_forward(l, *ins, run_block=run_block[l])
                out = shortcut(clamp_alpha(getattr(col, f"alpha{l}")), p, f)
                st.keep((j, l), out, offload=False)  # read by the neighbouring levels, never reconstructed
                cur.append(out)
                continue
            if p is not None and small_alpha[j][l]:
                st.keep((j - 1, l), p)
            ins = col.level_inputs(l, x, cur, prev or [None] * 4)
            down = ins[0]
            up = ins[1] if len(ins) > 1 else None
            up2 = ins[2] if len(ins) > 2 else None
            level = getattr(col, f"level{l}")
            st.fusion_needs[(j, l)] = [t.requires_grad for t in ins]
            fparams = [] if st.accumulate else list(level.fusion.parameters())
            if p is not None and st.lean and not st.block_mode and lean_block.kernels_in_use() and \
                    lean_block.kernels().couples and level.blocks:
                st.couplings[(j, l)] = coupling_operands(st.alphas[(j, l)], p)
            y = _Fusion.apply(st, j, l, down, up, up2, *fparams)
            for b, block in enumerate(level.blocks):
                if st.lean and st.block_mode:  # two nodes: the two large weight gradients one at a time
                    y = _Block.apply(st, j, l, b, y, *lean_block.body_params(block))
                    y = _BlockTail.apply(st, j, l, b, y, *lean_block.tail_params(block))
                elif st.lean:
                    y = _Block.apply(st, j, l, b, y, *lean_block.body_params(block), *lean_block.tail_params(block))
                else:
                    y = _Block.apply(st, j, l, b, y, *([] if st.accumulate else block.parameters()))
            out = _Shortcut.apply(st, j, l, y, p, None if st.accumulate else getattr(col, f"alpha{l}"))
            if boundary:
                st.keep((j, l), out)
            cur.append(out)
        prev = cur
        if j in taps:
            tapped[j] = cur[3]
    state = list(_Outputs.apply(*prev))
    if len(seg) - 1 in tapped:
        tapped[len(seg) - 1] = state[3]
    for i in range(len(seg), n):
        with lean_block.weight_casts(st.casts):
            state = columns[i](x, state, run_block=run_block)
        if i in taps:
            tapped[i] = state[3]
    return state, tapped
