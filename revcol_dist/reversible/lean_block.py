"""A ConvNeXt block's forward and backward written out by hand, for the reversible engine.

Autograd keeps about twelve channel-sized maps per block (input, conv output, LN output,
the two hidden-sized MLP maps, the pre-scale output). The backward needs far less:

- the layer-scale gradient sum_t g*o equals sum_k W2[c,k] * M[c,k] + b2[c] * sum_t g with
  M = g^T a, and dW2 = gamma * M: one matmul gives both, so the block output o is not needed
  (kept only where it is smaller than W2: few tokens, deep levels);
- the GELU output a is recomputed from its input h (elementwise);
- the LN output is recomputed from the conv output (one fused kernel).

``forward(..., keep=True)`` therefore keeps x, the conv output, mean/rstd and h (six
channel-sized maps instead of twelve); after ``saved_for_vjp`` even h is recomputed, a token
chunk at a time, so that only the block input is needed and hidden-sized transients stay bounded.
Every op is the one the module's own forward runs (same kernels, same autocast casts), so
the output is bitwise the module's and reconstruction stays exact.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from torch import nn

from . import block_kernels

# Token chunk of the hand-written MLP backward, in elements of (tokens x 4C): its
# hidden-sized transients are about three chunks. Small where h is recomputed (the
# memory-first "block" mode), large where h was kept (speed first). Tuned on a CPU, where
# small chunks stay in cache; a GPU wants few large GEMMs (hundreds of 2^16-element ones per
# block at level 0 would leave it idle), so there a chunk is 2^26 elements (256 MiB of fp32:
# RevCol-B's level 0 at batch 128 runs in two) and whole where h was kept.
CHUNK_ELEMENTS = 1 << 16
CHUNK_ELEMENTS_KEPT_H = 1 << 20
GPU_CHUNK_ELEMENTS = 1 << 26
GPU_CHUNK_ELEMENTS_KEPT_H = 1 << 62  # no chunking


def chunk_elements(device, kept_h: bool) -> int:
    """The chunk size, in (tokens x 4C) elements, for a tensor on ``device``."""
    if torch.device(device).type == "cuda":
        return GPU_CHUNK_ELEMENTS_KEPT_H if kept_h else GPU_CHUNK_ELEMENTS
    return CHUNK_ELEMENTS_KEPT_H if kept_h else CHUNK_ELEMENTS


class Saved(NamedTuple):
    x: torch.Tensor  # block input (NCHW); compiled, as the convolution read it (its compute dtype)
    d: torch.Tensor  # depthwise conv output (NCHW, conv compute dtype)
    mean: torch.Tensor
    rstd: torch.Tensor
    h: Optional[torch.Tensor]  # pwconv1 output (tokens x 4C); None: recomputed per chunk
    mask: Optional[torch.Tensor]  # drop path scale per sample (N,1,1,1), or None
    cdt: torch.dtype  # the MLP's compute dtype
    o: Optional[torch.Tensor] = None  # pwconv2 output (tokens x C), kept where smaller than its weight
    a: Optional[torch.Tensor] = None  # GELU output (tokens x 4C), kept only on request (speed over memory)
    n: Optional[torch.Tensor] = None  # LN output (tokens x C), only while a backward that recomputed h runs


class Kernels(NamedTuple):
    """The functions of ``block_kernels``, compiled (``parallel/compile.py``): used in place of
    the op-by-op code wherever a block runs whole."""
    forward_full: object
    hidden: object
    tail_grads: object
    body_grads: object
    fusion: object = None  # fusion_kernels.fusion_forward, for the reversible engine's levels
    shortcut: object = None  # coupling.shortcut_backward, for the reversible engine's shortcut nodes
    block_grads: object = None  # block_kernels.block_grads: tail and body in one call (``backward_both``)
    # whether the reversible forward may compute a level's coupling in its last block's graph:
    # not where each graph times its matmuls on the device (``train.compile_autotune``), as the
    # coupled graph and the recomputation's could then pick different kernels for pwconv2
    couples: bool = True


_KERNELS: Optional[Kernels] = None


def use_kernels(kernels: Optional[Kernels]) -> Optional[Kernels]:
    """Run whole blocks through ``kernels`` (None: op by op, bitwise the module's forward);
    returns the previous setting. Forward and recomputation then share the compiled graphs."""
    global _KERNELS
    previous, _KERNELS = _KERNELS, kernels
    return previous


def kernels_in_use() -> bool:
    return _KERNELS is not None


def kernels() -> Optional[Kernels]:
    """The kernels in use (None: eager)."""
    return _KERNELS


_CASTS: Optional[dict] = None  # (id(parameter), dtype) -> the parameter in that dtype (``weight_casts``)


@contextmanager
def weight_casts(cache: Optional[dict]):
    """Within, the compiled kernels take the blocks' conv and matmul weights in the compute
    dtype from ``cache``, cast once per cache (the reversible engine's: once per forward and
    backward) instead of inside every graph call: under autocast a compiled forward, its
    recomputation and its backward each cast them again (on a GPU, a kernel per weight each)."""
    global _CASTS
    previous, _CASTS = _CASTS, cache
    try:
        yield
    finally:
        _CASTS = previous


def _cast(p: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """p in dtype, from the cache where one is set (bitwise what a cast in the graph gives)."""
    if _CASTS is None or p is None or p.dtype == dtype:
        return p
    key = (id(p), dtype)
    cast = _CASTS.get(key)
    if cast is None:
        cast = _CASTS[key] = p.detach().to(dtype)
    return cast


_ALIGN = 64  # elements: each cast weight starts 128-byte aligned in bf16 (generated kernels assume 16)


def aligned_flat(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> Tuple[torch.Tensor, List[int]]:
    """``tensors`` in ``dtype``, concatenated into one flat buffer where each starts 128-byte
    aligned in bf16 (one concatenation, on a GPU a kernel per ~hundred tensors, and one cast),
    and each one's offset in it. (A 2x2 conv weight keeps its NCHW order here: inductor copies it
    channels-last in the graph; written channels-last here, it costs a copy per step and its
    gradient another, more than it saves, unless the parameter itself is channels-last.)"""
    pieces, offsets, at = [], [], 0
    pad = None
    for p in tensors:
        offsets.append(at)
        pieces.append(p.detach().reshape(-1))
        at += p.numel()
        if at % _ALIGN:
            if pad is None:
                pad = torch.zeros(_ALIGN, dtype=tensors[0].dtype, device=tensors[0].device)
            pieces.append(pad[: _ALIGN - at % _ALIGN])
            at += _ALIGN - at % _ALIGN
    # concatenated in the weights' own dtype, then cast: CUDA's batched concatenation needs one
    # dtype in and out (else it copies tensor by tensor)
    return torch.cat(pieces).to(dtype), offsets


def cast_tensors(cache: dict, tensors, dtype: torch.dtype) -> None:
    """``tensors`` in ``dtype``, into ``cache`` at once (``aligned_flat``), instead of a cast
    per weight; each cached weight is a view of one buffer."""
    ps = [p for p in tensors if p is not None and p.dtype != dtype and (id(p), dtype) not in cache]
    if not ps:
        return
    flat, offsets = aligned_flat(ps, dtype)
    for p, o in zip(ps, offsets):
        cache[(id(p), dtype)] = flat[o : o + p.numel()].view(p.shape)


def swapped(args, casts: dict):
    """``args`` (nested tuples) with each tensor that has a cast in ``casts`` (by ``id`` of the
    tensor it replaces) replaced by it."""
    if not casts:
        return args
    if isinstance(args, torch.Tensor):
        return casts.get(id(args), args)
    if isinstance(args, tuple) and not hasattr(args, "_fields"):
        return tuple(swapped(a, casts) for a in args)
    return args


def cast_weights(cache: dict, blocks, dtype: torch.dtype, extra=()) -> None:
    """The conv and matmul weights of ``blocks`` (and the tensors ``extra``) in ``dtype``,
    into ``cache`` at once (``cast_tensors``)."""
    cast_tensors(cache, [p for b in blocks for p in cast_targets(b)] + list(extra), dtype)


def cast_targets(block: nn.Module) -> Tuple[torch.Tensor, ...]:
    """What autocast casts in a block: the conv and the two Linears (not LayerNorm, not gamma)."""
    return (block.dwconv.weight, block.dwconv.bias, block.pwconv1.weight, block.pwconv1.bias,
            block.pwconv2.weight, block.pwconv2.bias)


def release_casts(cache: dict, tensors, dtype: torch.dtype) -> None:
    """Drop the casts of ``tensors`` (a block's or a fusion's ``cast_targets``) from ``cache``
    once their backward is done (the step's last use)."""
    for p in tensors:
        cache.pop((id(p), dtype), None)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; skips Tensor.to's call overhead in the common case (no autocast, same dtype)."""
    return t if t.dtype == dtype else t.to(dtype)


def _ln_dtype(d: torch.Tensor, block: nn.Module) -> torch.dtype:
    # autocast runs layer_norm in fp32; without autocast this is d's own dtype
    return torch.promote_types(d.dtype, block.norm.weight.dtype)


def _drop_mask(block: nn.Module, batch: int, dtype: torch.dtype, device) -> Optional[torch.Tensor]:
    """The scaled mask DropPath draws for the block's (N, C, H, W) branch: same shape, dtype
    and draw as the module's (keyed, or from the generator whose state replay restores)."""
    dp = block.drop_path
    if dp.p == 0.0 or not dp.training:
        return None
    return dp.scaled_mask(batch, 4, dtype, device)


def _conv(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    c = block.dwconv
    return F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)


def compute_dtype(block: nn.Module, d: torch.Tensor) -> torch.dtype:
    """The MLP's dtype: autocast's where it is on (call inside the forward's autocast state)."""
    dev = d.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else _ln_dtype(d, block)


def _layer_norm(block: nn.Module, d: torch.Tensor):
    """LN over channels of the NCHW conv output; returns (n NHWC, mean, rstd)."""
    dt = _ln_dtype(d, block)
    dp = _as(d.permute(0, 2, 3, 1), dt)
    norm = block.norm  # bf16 weights (DeepSpeed's bf16 mode) are raised to the input's dtype, as the module does
    w, b = _as(norm.weight, dt), _as(norm.bias, dt)
    return torch.native_layer_norm(dp, norm.normalized_shape, w, b, norm.eps)


def _normalized(block: nn.Module, s: Saved) -> torch.Tensor:
    """The LN output again (one fused kernel, bitwise the forward's)."""
    return _layer_norm(block, s.d)[0]


@torch.no_grad()
def forward(block: nn.Module, x: torch.Tensor, keep: bool = False, keep_gelu: bool = False,
            keep_hidden: bool = True, couple: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """The block's output, computed as its module does; with keep, also what ``backward`` needs
    (with keep_gelu also the GELU output, saving its recomputation: for transient graphs;
    without keep_hidden not even h, which ``with_hidden`` recomputes before backward). With
    ``couple`` (alpha, prev), the output is the level's coupling ``alpha * prev + output``,
    in the compiled graph's last pass (``block_kernels.forward_full``)."""
    if _KERNELS is not None:
        return _forward_kernels(block, x, keep, keep_gelu, keep_hidden, couple)
    if couple is not None:
        out, saved = forward(block, x, keep, keep_gelu, keep_hidden)
        return torch.addcmul(out, *couple), saved
    d = _conv(block, x)
    n, mean, rstd = _layer_norm(block, d)
    h = F.linear(n, block.pwconv1.weight, block.pwconv1.bias)
    del n
    a = F.gelu(h)
    o = F.linear(a, block.pwconv2.weight, block.pwconv2.bias)
    out, mask = _residual(block, x, o)
    if not keep:
        return out, None
    # Few tokens (deep levels): keeping o (tokens x C) is cheaper than the two weight-sized
    # passes of the layer-scale trick in ``backward_tail``.
    o = o.flatten(0, 2) if keeps_output(block, o) else None
    return out, Saved(x, d, mean, rstd, h.flatten(0, 2) if keep_hidden else None, mask, h.dtype, o,
                      a.flatten(0, 2) if keep_gelu else None)


def _tensors(block: nn.Module) -> Tuple[torch.Tensor, ...]:
    """The block's tensors in ``block_kernels.forward_full``'s order."""
    return (block.dwconv.weight, block.dwconv.bias, block.norm.weight, block.norm.bias, block.pwconv1.weight,
            block.pwconv1.bias, block.pwconv2.weight, block.pwconv2.bias, block.gamma)


def _conv_args(block: nn.Module) -> block_kernels.Conv:
    c = block.dwconv
    return tuple(c.stride), tuple(c.padding), tuple(c.dilation), c.groups


def _forward_kernels(block: nn.Module, x: torch.Tensor, keep: bool, keep_gelu: bool, keep_hidden: bool,
                     couple: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """``forward`` through the compiled kernels: the drop-path mask is drawn here (same draw,
    dtype and shape as the module's), the rest is one compiled call."""
    dev = x.device.type
    conv_dt = torch.promote_types(x.dtype, block.dwconv.weight.dtype)
    cdt = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
           else torch.promote_types(conv_dt, block.norm.weight.dtype))
    mask = _drop_mask(block, x.shape[0], torch.promote_types(block.gamma.dtype, cdt), x.device)
    cw, cb, lw, lb, w1, b1, w2, b2, gamma = _tensors(block)
    if _CASTS is not None and torch.is_autocast_enabled(dev):  # what autocast would cast in the graph
        cw, cb, w1, b1, w2, b2 = (_cast(t, cdt) for t in (cw, cb, w1, b1, w2, b2))
    # x detached: the forward passes an input that requires grad, the recomputation a detached
    # one, and a compiled function guards on requires_grad: the two would compile (and, with
    # train.compile_autotune, time) two graphs, where exact reconstruction needs one
    out, d, mean, rstd, h, a, o, xc = _KERNELS.forward_full(x.detach(), cw, cb, lw, lb, w1, b1, w2, b2, gamma, mask,
                                                            _conv_args(block), block.norm.eps,
                                                            *(t.detach() for t in couple or ()))
    if not keep:
        return out, None
    return out, Saved(xc, d, mean, rstd, h.flatten(0, 2) if keep_hidden else None, mask, h.dtype,
                      o.flatten(0, 2) if keeps_output(block, o) else None, a.flatten(0, 2) if keep_gelu else None)


def keeps_output(block: nn.Module, o: torch.Tensor) -> bool:
    """Whether the backward keeps pwconv2's output: where it is smaller than pwconv2's weight."""
    return o.shape[0] * o.shape[1] * o.shape[2] < block.pwconv2.weight.shape[1]


@torch.no_grad()
def with_hidden(block: nn.Module, s: Saved) -> Saved:
    """s with pwconv1's output recomputed whole (one matmul), for a backward that runs at speed."""
    if s.h is not None:
        return s
    if _KERNELS is not None:
        n, h = _KERNELS.hidden(s.d, block.norm.weight, block.norm.bias, _cast(block.pwconv1.weight, s.cdt),
                               _cast(block.pwconv1.bias, s.cdt), block.norm.eps, s.cdt)
        return s._replace(h=h, n=n)
    n = _normalized(block, s).flatten(0, 2)
    return s._replace(h=_hidden(block, s, n, 0, n.shape[0]), n=n)


@torch.no_grad()
def forward_chunked(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's output with its MLP run a token chunk at a time: the hidden-sized maps
    never exist whole (the memory-first recompute)."""
    d = _conv(block, x)
    n = _layer_norm(block, d)[0]
    del d
    N, H, W, C = n.shape
    n = n.reshape(-1, C)
    T = n.shape[0]

    def mlp(rows: torch.Tensor) -> torch.Tensor:
        h = F.linear(rows, block.pwconv1.weight, block.pwconv1.bias)
        return F.linear(F.gelu(h), block.pwconv2.weight, block.pwconv2.bias)

    step = _rows_per_chunk(block, chunk_elements(x.device, kept_h=False))
    if step >= T:
        o = mlp(n)
    else:
        o = None
        for t0 in range(0, T, step):
            oc = mlp(n[t0:t0 + step])
            if o is None:
                o = oc.new_empty(T, C)
            o[t0:t0 + step] = oc
            del oc
    del n
    return _residual(block, x, o.view(N, H, W, C))[0]


def _residual(block: nn.Module, x: torch.Tensor, o: torch.Tensor):
    """x + drop_path(gamma * o) as the module computes it (o NHWC); also the drop-path mask."""
    y = (block.gamma * o).permute(0, 3, 1, 2)
    mask = _drop_mask(block, y.shape[0], y.dtype, y.device)
    return x + (y * mask if mask is not None else y), mask


@torch.no_grad()
def saved_for_vjp(block: nn.Module, x: torch.Tensor) -> Saved:
    """What ``backward`` needs, recomputed from the block input without the MLP (memory-lean VJP)."""
    d = _conv(block, x)
    _, mean, rstd = _layer_norm(block, d)
    cdt = compute_dtype(block, d)
    mask = _drop_mask(block, x.shape[0], torch.promote_types(block.gamma.dtype, cdt), x.device)
    return Saved(x, d, mean, rstd, None, mask, cdt)


TAIL = ("gamma", "pwconv2.weight", "pwconv2.bias")  # gradients the tail node returns
BODY = ("dwconv.weight", "dwconv.bias", "norm.weight", "norm.bias", "pwconv1.weight", "pwconv1.bias")


def _tokens(block: nn.Module, s: Saved, g: torch.Tensor):
    """g as the gradient of gamma*o (drop path applied), tokens x C."""
    gy = g if s.mask is None else g * s.mask
    N, C, H, W = g.shape
    return gy.permute(0, 2, 3, 1).reshape(N * H * W, C)


def _hidden(block: nn.Module, s: Saved, n: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
    """pwconv1's output for tokens [t0, t1): kept, or recomputed from the LN output."""
    if s.h is not None:
        return s.h[t0:t1]
    return F.linear(_as(n[t0:t1], s.cdt), _as(block.pwconv1.weight, s.cdt), _as(block.pwconv1.bias, s.cdt))


def _rows_per_chunk(block: nn.Module, elements: int) -> int:
    """Tokens per chunk so that a (tokens x 4C) chunk has about ``elements`` elements."""
    return max(1, elements // block.pwconv1.weight.shape[0])


def _chunk(block: nn.Module, s: Saved) -> int:
    return _rows_per_chunk(block, chunk_elements(s.x.device, kept_h=s.h is not None))


@torch.no_grad()
def backward_tail(block: nn.Module, s: Saved, g: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Gradients of TAIL in order: layer scale and pwconv2 (their own autograd node, so that
    the block's two large weight gradients need not be alive together)."""
    if _KERNELS is not None and s.h is not None:
        return _KERNELS.tail_grads(g, s.mask, s.h, s.a, s.o, block.pwconv2.weight, block.pwconv2.bias, block.gamma,
                                   s.cdt)
    w2, b2, gamma = block.pwconv2.weight, block.pwconv2.bias, block.gamma
    gy = _tokens(block, s, g)
    T, C = gy.shape
    acc = torch.promote_types(s.cdt, torch.float32)
    n = _normalized(block, s).reshape(T, -1) if s.h is None else None
    # with o kept: dW2 = g_o^T a directly; else M = gy^T a (then dW2 = gamma * M)
    lhs = gy if s.o is None else gy * gamma
    M = None
    step = _chunk(block, s)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        a = s.a[t0:t1] if s.a is not None else F.gelu(_hidden(block, s, n, t0, t1))
        M = _mm_acc(M, _as(lhs[t0:t1], s.cdt).t(), a, acc)
        del a
    del n, lhs
    gy_sum = gy.sum(0)
    if s.o is not None:
        g_gamma = (gy * s.o).sum(0)
        gW2 = M
    else:
        # sum_t gy*o = sum_k W2[c,k] M[c,k] + b2[c] sum_t gy, row-chunked to bound the temporary
        rows = _rows_per_chunk(block, chunk_elements(M.device, kept_h=False))
        w2a = _as(w2, acc)
        g_gamma = torch.cat([torch.linalg.vecdot(M[r:r + rows], w2a[r:r + rows]) for r in range(0, C, rows)])
        if b2 is not None:
            g_gamma += b2 * gy_sum
        gW2 = M.mul_(gamma[:, None])  # gamma * gy^T a = g_o^T a
    del gy
    return _as(g_gamma, gamma.dtype), _as(gW2, w2.dtype), (gamma * gy_sum).to(b2.dtype)


@torch.no_grad()
def backward_body(block: nn.Module, s: Saved, g: torch.Tensor) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """(gradient of the block input, gradients of BODY in order)."""
    if _KERNELS is not None and s.h is not None:
        cw, cb, lw, lb, w1, b1 = body_params(block)
        pdt = w1.dtype
        return _KERNELS.body_grads(g, s.x, s.d, s.mean, s.rstd, s.h, s.n, s.mask, _cast(cw, s.d.dtype),
                                   _cast(cb, s.d.dtype), lw, lb, _cast(w1, s.cdt), _cast(b1, s.cdt),
                                   _cast(block.pwconv2.weight, s.cdt), block.gamma, s.cdt, _conv_args(block),
                                   block.norm.eps, pdt)
    N, C, H, W = g.shape
    w1, b1, w2 = block.pwconv1.weight, block.pwconv1.bias, block.pwconv2.weight
    cdt = s.cdt
    acc = torch.promote_types(cdt, torch.float32)
    gy = _tokens(block, s, g)
    T = gy.shape[0]
    g_o = (gy * block.gamma).to(cdt)
    del gy
    n = s.n if s.n is not None else _normalized(block, s).reshape(T, C)
    w1c, w2c = _as(w1, cdt), _as(w2, cdt)
    gW1 = gb1 = None
    g_n = torch.empty(T, C, dtype=cdt, device=g.device)
    step = _chunk(block, s)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        g_h = torch.ops.aten.gelu_backward(g_o[t0:t1] @ w2c, _hidden(block, s, n, t0, t1))
        gW1 = _mm_acc(gW1, g_h.t(), _as(n[t0:t1], cdt), acc)
        gb1 = _acc(gb1, g_h.sum(0), acc)
        torch.mm(g_h, w1c, out=g_n[t0:t1])
        del g_h
    del g_o, n
    gW1, gb1 = _as(gW1, w1.dtype), _as(gb1, b1.dtype)
    ln_dt = _ln_dtype(s.d, block)
    dp = _as(s.d.permute(0, 2, 3, 1), ln_dt)
    g_dp, g_lw, g_lb = torch.ops.aten.native_layer_norm_backward(
        _as(g_n.view(N, H, W, C), ln_dt), dp, block.norm.normalized_shape, s.mean, s.rstd,
        _as(block.norm.weight, ln_dt), _as(block.norm.bias, ln_dt), [True, True, True],
    )
    g_lw, g_lb = _as(g_lw, block.norm.weight.dtype), _as(g_lb, block.norm.bias.dtype)
    del g_n, dp
    conv = block.dwconv
    g_x, g_cw, g_cb = torch.ops.aten.convolution_backward(
        _as(g_dp.permute(0, 3, 1, 2), s.d.dtype), _as(s.x, s.d.dtype), _as(conv.weight, s.d.dtype), [C],
        conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups, [True, True, conv.bias is not None],
    )
    del g_dp
    grads = (_as(g_cw, conv.weight.dtype), _as(g_cb, conv.bias.dtype), g_lw, g_lb, gW1, gb1)
    return _as(g_x, g.dtype).add_(g), grads


@torch.no_grad()
def backward_both(block: nn.Module, s: Saved, g: torch.Tensor,
                  couple: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Both parts in one call: (gradient of the block input, gradients of BODY + TAIL). Compiled,
    one graph (``block_grads``); eager, each part lays out g itself: sharing that copy would keep
    it alive through the body's LN and conv backward. With ``couple`` (alpha, prev): the block's
    output was the coupling alpha * prev + out, and (alpha's gradient, prev's) follow."""
    if _KERNELS is not None and _KERNELS.block_grads is not None and s.h is not None:
        cw, cb, lw, lb, w1, b1 = body_params(block)
        w2 = block.pwconv2.weight
        return _KERNELS.block_grads(g, s.x, s.d, s.mean, s.rstd, s.h, s.a, s.o, s.n, s.mask, _cast(cw, s.d.dtype),
                                    _cast(cb, s.d.dtype), lw, lb, _cast(w1, s.cdt), _cast(b1, s.cdt), _cast(w2, s.cdt),
                                    w2, block.pwconv2.bias, block.gamma, s.cdt, _conv_args(block), block.norm.eps,
                                    w1.dtype, *(couple if couple is not None else ()))
    tail = backward_tail(block, s, g)
    g_x, body = backward_body(block, s, g)
    coupling = () if couple is None else ((g * couple[1]).sum(dim=(0, 2, 3), keepdim=True), couple[0] * g)
    return g_x, body + tail + coupling


def _acc(total: Optional[torch.Tensor], part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    part = _as(part, dtype)
    return part if total is None else total.add_(part)


def _mm_acc(total: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if total is not None and total.dtype == a.dtype:
        return total.addmm_(a, b)
    return _acc(total, a @ b, dtype)  # reduced precision: each chunk's product summed in fp32


def like_param(g: Optional[torch.Tensor], p: torch.Tensor) -> Optional[torch.Tensor]:
    """A gradient laid out like its parameter. A depthwise kernel's gradient (C, 1, k, k) may
    come with a different (equally contiguous) stride on the size-1 dim; DDP then warns that
    grad and bucket strides differ and copies through a slower path."""
    if g is None or g.stride() == p.stride() or not (g.is_contiguous() and p.is_contiguous()):
        return g
    return g.as_strided(p.shape, p.stride())


def body_params(block: nn.Module) -> Tuple[torch.Tensor, ...]:
    """The parameters ``backward_body`` returns gradients for, in the order of BODY."""
    return (block.dwconv.weight, block.dwconv.bias, block.norm.weight, block.norm.bias,
            block.pwconv1.weight, block.pwconv1.bias)


def tail_params(block: nn.Module) -> Tuple[torch.Tensor, ...]:
    """The parameters ``backward_tail`` returns gradients for, in the order of TAIL."""
    return (block.gamma, block.pwconv2.weight, block.pwconv2.bias)


class _Holder:
    """What the forward saved for the backward (one node, or the body node's for the tail node that
    runs first), and the forward's weight casts."""

    def __init__(self, block: nn.Module, keep_hidden: bool) -> None:
        self.block, self.keep_hidden, self.saved = block, keep_hidden, None
        self.casts = _CASTS  # the forward's weight casts, for the backward too (``weight_casts``)


def _freed(holder: Optional[_Holder]) -> _Holder:
    if holder is None or holder.saved is None:
        raise RuntimeError(
            "lean ConvNeXt block: what its forward kept was freed by an earlier backward. A second backward "
            "through the same graph (retain_graph=True) is not supported by the lean blocks; set "
            "model.reversible = False and train.compile = false for that use."
        )
    return holder


class _LeanBody(torch.autograd.Function):
    @staticmethod
    def forward(ctx, holder: _Holder, x: torch.Tensor, *body_params: torch.Tensor):
        out, holder.saved = forward(holder.block, x, keep=True, keep_hidden=holder.keep_hidden)
        ctx.holder = holder
        return out

    @staticmethod
    def backward(ctx, g):
        holder = _freed(ctx.holder)
        with weight_casts(holder.casts):
            g_x, grads = backward_body(holder.block, holder.saved, g)
        holder.saved = ctx.holder = holder.casts = None
        return (None, g_x, *[like_param(gp, p) for gp, p in zip(grads, body_params(holder.block))])


class _LeanTail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, holder: _Holder, out: torch.Tensor, *tail_params: torch.Tensor):
        ctx.holder = holder
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        holder = _freed(ctx.holder)
        ctx.holder = None
        # h not kept: recomputed once here, used by both nodes, gone after the body's backward
        with weight_casts(holder.casts):
            holder.saved = with_hidden(holder.block, holder.saved)
        grads = backward_tail(holder.block, holder.saved, g)
        return (None, g, *[like_param(gp, p) for gp, p in zip(grads, tail_params(holder.block))])


class _LeanBlock(_LeanBody):
    """The body's forward, and in one backward the body's and the tail's gradients (its
    parameters: the body's, then the tail's)."""

    @staticmethod
    def backward(ctx, g):
        holder = _freed(ctx.holder)
        block = holder.block
        with weight_casts(holder.casts):
            g_x, grads = backward_both(block, with_hidden(block, holder.saved), g)
        holder.saved = ctx.holder = holder.casts = None
        return (None, g_x, *[like_param(gp, p) for gp, p in zip(grads, body_params(block) + tail_params(block))])


class _LeanCoupledBlock(torch.autograd.Function):
    """A level's last block and its coupling c = alpha * prev + block(x) as one node: the
    coupling in the block's last forward pass, its gradients (alpha's sum over batch and space,
    prev's alpha * g) in the block's backward graph, which reads g anyway."""

    @staticmethod
    def forward(ctx, holder: _Holder, x: torch.Tensor, alpha: torch.Tensor, prev: torch.Tensor, *params: torch.Tensor):
        out, holder.saved = forward(holder.block, x, keep=True, keep_hidden=holder.keep_hidden, couple=(alpha, prev))
        ctx.holder = holder
        ctx.save_for_backward(alpha, prev)
        return out

    @staticmethod
    def backward(ctx, g):
        holder = _freed(ctx.holder)
        block = holder.block
        with weight_casts(holder.casts):
            g_x, grads = backward_both(block, with_hidden(block, holder.saved), g, couple=ctx.saved_tensors)
        holder.saved = ctx.holder = holder.casts = None
        *grads, g_alpha, g_prev = grads
        needs = ctx.needs_input_grad
        return (None, g_x, g_alpha if needs[2] else None, g_prev if needs[3] else None,
                *[like_param(gp, p) for gp, p in zip(grads, body_params(block) + tail_params(block))])


def lean_block(block: nn.Module, x: torch.Tensor, keep_hidden: bool = True, one_node: bool = False,
               couple: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """The block under ordinary autograd, keeping six channel-sized maps instead of twelve
    (the engine's plain columns use it), two without the hidden map h (``keep_hidden=False``:
    pwconv1 runs again in backward). Two nodes, pwconv2/layer-scale gradients first, so that the
    block's two large weight gradients are never alive together; ``one_node``: one node, whose
    backward is one compiled graph where the kernels are compiled (``block_grads``: one call
    where there were two, g read once), for a forward that is not short of memory
    (``memory_policy: plain``). ``couple`` (alpha, prev; one node): the output is the level's
    coupling alpha * prev + block(x), in the block's own kernels (``_LeanCoupledBlock``)."""
    holder = _Holder(block, keep_hidden)
    if couple is not None:
        return _LeanCoupledBlock.apply(holder, x, *couple, *body_params(block), *tail_params(block))
    if one_node:
        return _LeanBlock.apply(holder, x, *body_params(block), *tail_params(block))
    out = _LeanBody.apply(holder, x, *body_params(block))
    return _LeanTail.apply(holder, out, *tail_params(block))
