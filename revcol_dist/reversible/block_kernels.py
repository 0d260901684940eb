"""A ConvNeXt block's lean forward and backward as functions of tensors, for ``torch.compile``.

``lean_block``'s eager functions read a block module and run op by op (about twenty kernels
per block forward on a GPU, most of them casts, permutes and elementwise passes). These take
the block's tensors and a few constants instead, so that

- one compiled graph per shape serves every block of a level (guards on shapes and dtypes,
  never on a module), with the elementwise chains between the matmuls fused;
- the forward and the reversible recomputation call the same graph, so they run the same
  generated kernels and the recomputed level output is bitwise the forward's (reconstruction
  stays exact, as in eager mode). The forward's last block of a level adds the coupling in its
  last pass (``prev``): the same arithmetic for the block output, then one multiply-add.

The arithmetic is ``lean_block``'s, whole (no token chunks: a GPU wants few large GEMMs).
``parallel/compile.py`` compiles them; uncompiled they run as ordinary eager code (tests).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Conv = Tuple[tuple, tuple, tuple, int]  # stride, padding, dilation, groups


def _to(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _norm(d: torch.Tensor, lw: torch.Tensor, lb: torch.Tensor, eps: float):
    """LayerNorm over the channels of the NCHW conv output, in its promoted dtype (fp32 under
    autocast, as CUDA autocast runs layer_norm): (n NHWC, mean, rstd)."""
    dt = torch.promote_types(d.dtype, lw.dtype)
    return torch.native_layer_norm(_to(d.permute(0, 2, 3, 1), dt), [d.shape[1]], _to(lw, dt), _to(lb, dt), eps)


def forward_full(x, cw, cb, lw, lb, w1, b1, w2, b2, gamma, mask: Optional[torch.Tensor], conv: Conv, eps: float,
                 alpha: Optional[torch.Tensor] = None, prev: Optional[torch.Tensor] = None):
    """(out, conv output d, mean, rstd, h, a = gelu(h), o, xc): the block's output and
    everything its backward may need. The forward keeps none of it; returning it costs no extra
    kernel (each is the output of a matmul, a convolution or a fused reduction anyway). ``xc``
    is x as the convolution reads it (cast to the weight's dtype, as autocast would cast it):
    the backward's convolution gradient reads it again instead of casting x a second time.

    With ``prev``, out is a level's coupling ``alpha * prev + out`` (``coupling.shortcut``)
    in the pass that writes the block's output: the reversible forward's last block of a level,
    whose own output is never needed (the recomputation, without ``prev``, computes it by the
    same arithmetic, which the inverse subtracts)."""
    xc = _to(x, cw.dtype) if cw.dtype in (torch.bfloat16, torch.float16) else x
    d = F.conv2d(xc, cw, cb, *conv)
    n, mean, rstd = _norm(d, lw, lb, eps)
    h = F.linear(n, w1, b1)
    a = F.gelu(h)
    o = F.linear(a, w2, b2)
    y = (gamma * o).permute(0, 3, 1, 2)
    out = x + (y * mask if mask is not None else y)
    if prev is not None:
        out = torch.addcmul(out, alpha, prev)
    return out, d, mean, rstd, h, a, o, xc


def hidden(d, lw, lb, w1, b1, eps: float, cdt: torch.dtype):
    """(LN output, pwconv1 output), tokens first: h again for a backward that did not keep it."""
    n = _norm(d, lw, lb, eps)[0].flatten(0, 2)
    return n, F.linear(_to(n, cdt), _to(w1, cdt), _to(b1, cdt))


def _tokens(g: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    gy = g if mask is None else g * mask
    return gy.permute(0, 2, 3, 1).flatten(0, 2)


def tail_grads(g, mask, h, a, o, w2, b2, gamma, cdt: torch.dtype):
    """Gradients of (gamma, pwconv2.weight, pwconv2.bias), as ``lean_block.backward_tail``."""
    acc = torch.promote_types(cdt, torch.float32)
    gy = _tokens(g, mask)
    a = a if a is not None else F.gelu(h)
    lhs = gy if o is None else gy * gamma
    m = _to(_to(lhs, cdt).t() @ a, acc)
    gy_sum = gy.sum(0)
    if o is not None:
        g_gamma, gw2 = (gy * o).sum(0), m
    else:  # sum_t gy*o = sum_k W2[c,k] M[c,k] + b2[c] sum_t gy: o itself is not needed
        g_gamma = (m * _to(w2, acc)).sum(1)
        if b2 is not None:
            g_gamma = g_gamma + b2 * gy_sum
        gw2 = m * gamma[:, None]
    return _to(g_gamma, gamma.dtype), _to(gw2, w2.dtype), _to(gamma * gy_sum, b2.dtype)


BIAS_PAD = 8  # columns appended to a matmul's input for its bias gradient (16-byte rows in bf16)


def _linear_grads(g: torch.Tensor, inp: torch.Tensor, acc: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) gradients of a linear layer from its output's gradient g (tokens x out)
    and its input (tokens x in). In bf16/fp16 the bias's sum over tokens is one more column of
    the weight's matmul (the input padded with a column of ones, and zeros to keep rows
    aligned), so that g, the largest map of a block's backward, is read once, by the matmul, and
    not again by a reduction; rounded like the weight's, in the matmul's dtype (autocast's own
    bias gradient is rounded to it too). In fp32 a plain sum: a TF32 matmul would round g first."""
    if g.dtype not in (torch.bfloat16, torch.float16):
        return _to(g.t() @ inp, acc), _to(g.sum(0), acc)
    c = inp.shape[1]
    col = torch.arange(c + BIAS_PAD, device=inp.device)
    padded = torch.where(col == c, torch.ones((), dtype=inp.dtype, device=inp.device), F.pad(inp, (0, BIAS_PAD)))
    m = g.t() @ padded
    return _to(m[:, :c], acc), _to(m[:, c], acc)


def body_grads(g, x, d, mean, rstd, h, n, mask, cw, cb, lw, lb, w1, b1, w2, gamma, cdt: torch.dtype,
               conv: Conv, eps: float, pdt: Optional[torch.dtype] = None):
    """(gradient of the block input, gradients of dwconv.weight, dwconv.bias, norm.weight,
    norm.bias, pwconv1.weight, pwconv1.bias), as ``lean_block.backward_body``. ``pdt``: the
    parameters' dtype where cw, cb, w1, b1, w2 come as copies in the compute dtype."""
    N, C, H, W = g.shape
    acc = torch.promote_types(cdt, torch.float32)
    g_o = _to(_tokens(g, mask) * gamma, cdt)
    if n is None:
        n = _norm(d, lw, lb, eps)[0].flatten(0, 2)
    g_h = torch.ops.aten.gelu_backward(g_o @ _to(w2, cdt), h)
    gw1, gb1 = _linear_grads(g_h, _to(n, cdt), acc)
    g_n = g_h @ _to(w1, cdt)
    ln_dt = torch.promote_types(d.dtype, lw.dtype)
    g_dp, g_lw, g_lb = torch.ops.aten.native_layer_norm_backward(
        _to(g_n.view(N, H, W, C), ln_dt), _to(d.permute(0, 2, 3, 1), ln_dt), [C], mean, rstd,
        _to(lw, ln_dt), _to(lb, ln_dt), [True, True, True])
    stride, padding, dilation, groups = conv
    g_x, g_cw, g_cb = torch.ops.aten.convolution_backward(
        _to(g_dp.permute(0, 3, 1, 2), d.dtype), _to(x, d.dtype), _to(cw, d.dtype), [C],
        stride, padding, dilation, False, [0, 0], groups, [True, True, cb is not None])
    grads = (_to(g_cw, pdt or cw.dtype), _to(g_cb, pdt or cb.dtype) if cb is not None else None,
             _to(g_lw, lw.dtype), _to(g_lb, lb.dtype), _to(gw1, pdt or w1.dtype), _to(gb1, pdt or b1.dtype))
    return _to(g_x, g.dtype) + g, grads


def block_grads(g, x, d, mean, rstd, h, a, o, n, mask, cw, cb, lw, lb, w1, b1, w2c, w2, b2, gamma, cdt: torch.dtype,
                conv: Conv, eps: float, pdt: Optional[torch.dtype] = None,
                alpha: Optional[torch.Tensor] = None, prev: Optional[torch.Tensor] = None):
    """``tail_grads`` and ``body_grads`` as one graph, for a backward that takes both at once
    (the reversible engine's levels): (gradient of the block input, BODY's gradients + TAIL's).
    One compiled call where there were two, and what both read of g (its token layout, the
    drop-path mask) is read once. ``w2c``: pwconv2's weight in the compute dtype (the body's
    matmul), ``w2``: the parameter (the tail's gradient dtype and layer-scale identity).

    With ``prev``, the block's output was the coupling c = alpha * prev + out (``forward_full``)
    and g is c's gradient (so also out's): (alpha's gradient, prev's) follow BODY's and TAIL's,
    its sum over batch and space beside the graph's other sums over the tokens of g."""
    tail = tail_grads(g, mask, h, a, o, w2, b2, gamma, cdt)
    g_x, body = body_grads(g, x, d, mean, rstd, h, n, mask, cw, cb, lw, lb, w1, b1, w2c, gamma, cdt, conv, eps, pdt)
    if prev is None:
        return g_x, body + tail
    return g_x, body + tail + ((g * prev).sum(dim=(0, 2, 3), keepdim=True), alpha * g)
