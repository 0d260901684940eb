"""The hand-written ConvNeXt block backward against autograd through the module itself."""

import pytest
import torch

from revcol_dist.models.layers import ConvNeXtBlock
from revcol_dist.monitor.live_bytes import LiveBytes
from revcol_dist.reversible import lean_block


def make(channels, dtype=torch.float64, drop_path=0.3, spatial=(9, 11), batch=4, seed=0):
    torch.manual_seed(seed)
    block = ConvNeXtBlock(channels, 4 * channels, 7, drop_path, layer_scale_init=0.5).to(dtype).train()
    x = torch.randn(batch, channels, *spatial, dtype=dtype, requires_grad=True)
    g = torch.randn(batch, channels, *spatial, dtype=dtype)
    return block, x, g


def autograd_grads(block, x, g, rng):
    torch.set_rng_state(rng)
    out = block(x)
    gx, *gp = torch.autograd.grad(out, [x, *block.parameters()], g)
    names = [n for n, _ in block.named_parameters()]
    return out.detach(), gx, dict(zip(names, gp))


def named_backward(block, saved, g):
    """(gradient of the block input, {parameter name: gradient})."""
    g_x, grads = lean_block.backward_both(block, saved, g)
    return g_x, dict(zip(lean_block.BODY + lean_block.TAIL, grads))


def worst(ref_x, ref_p, gx, gp):
    errs = [((gx - ref_x).abs().max() / ref_x.abs().max()).item()]
    for n, r in ref_p.items():
        errs.append(((gp[n] - r).abs().max() / r.abs().max()).item())
    return max(errs)


# (channels, spatial): many tokens per channel (layer-scale trick) and few (pwconv2 output kept)
SHAPES = [(16, (9, 11)), (64, (3, 3))]


@pytest.mark.parametrize("channels,spatial", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_kept_backward_matches_autograd(channels, spatial, dtype, tol):
    block, x, g = make(channels, dtype, spatial=spatial)
    rng = torch.get_rng_state()
    out, ref_x, ref_p = autograd_grads(block, x, g, rng)
    for keep_gelu in (False, True):
        torch.set_rng_state(rng)
        out2, saved = lean_block.forward(block, x.detach(), keep=True, keep_gelu=keep_gelu)
        assert torch.equal(out, out2)  # bitwise: reconstruction relies on it
        assert (saved.o is not None) == (channels == 64)
        gx, gp = named_backward(block, saved, g)
        assert set(gp) == set(ref_p)
        assert worst(ref_x, ref_p, gx, gp) < tol


@pytest.mark.parametrize("chunk", [1 << 16, 100])
def test_recomputed_backward_matches_autograd(monkeypatch, chunk):
    """The memory-lean VJP: h recomputed a token chunk at a time (chunk=100: many chunks)."""
    monkeypatch.setattr(lean_block, "CHUNK_ELEMENTS", chunk)
    block, x, g = make(16)
    rng = torch.get_rng_state()
    out, ref_x, ref_p = autograd_grads(block, x, g, rng)
    torch.set_rng_state(rng)
    chunked = lean_block.forward_chunked(block, x.detach())
    if chunk == 1 << 16:  # one chunk: the module's own kernels, bitwise
        assert torch.equal(out, chunked)
    else:  # one-token matmuls round differently (the engine uses the chunked forward both ways)
        assert ((out - chunked).abs().max() / out.abs().max()).item() < 1e-14
    torch.set_rng_state(rng)
    saved = lean_block.saved_for_vjp(block, x.detach())
    assert saved.h is None
    gx, gp = named_backward(block, saved, g)
    assert worst(ref_x, ref_p, gx, gp) < 1e-12


@pytest.mark.parametrize("one_node", [False, True], ids=["two_nodes", "one_node"])
@pytest.mark.parametrize("keep_hidden", [True, False], ids=["h_kept", "h_recomputed"])
def test_autograd_function_and_autograd_grad(one_node, keep_hidden):
    block, x, g = make(16)
    rng = torch.get_rng_state()
    out, ref_x, ref_p = autograd_grads(block, x, g, rng)
    torch.set_rng_state(rng)
    y = lean_block.lean_block(block, x, keep_hidden=keep_hidden, one_node=one_node)
    assert torch.equal(y, out)
    gx, *gp = torch.autograd.grad(y, [x, *block.parameters()], g)
    names = [n for n, _ in block.named_parameters()]
    assert worst(ref_x, ref_p, gx, dict(zip(names, gp))) < 1e-12


@pytest.mark.parametrize("keep_hidden", [True, False], ids=["h_kept", "h_recomputed"])
def test_coupled_block_matches_the_block_then_the_coupling_under_autograd(keep_hidden):
    """A level's last block with its coupling c = alpha * prev + block(x) as one node: the
    same c, and the gradients of x, alpha, prev and the block's parameters autograd gives for
    the block followed by ``coupling.shortcut``."""
    from revcol_dist.reversible.coupling import coupling_operands, shortcut

    block, x, g = make(16)
    gen = torch.Generator().manual_seed(7)
    alpha = (torch.rand(1, 16, 1, 1, generator=gen, dtype=torch.float64) + 0.2).requires_grad_()
    prev = torch.randn(x.shape, generator=gen, dtype=torch.float64).requires_grad_()
    wrt = [x, alpha, prev, *block.parameters()]
    rng = torch.get_rng_state()
    ref = shortcut(alpha, prev, block(x))
    ref_grads = torch.autograd.grad(ref, wrt, g)
    torch.set_rng_state(rng)
    c = lean_block.lean_block(block, x, keep_hidden=keep_hidden, one_node=True, couple=coupling_operands(alpha, prev))
    assert torch.equal(c, ref)
    for r, o in zip(ref_grads, torch.autograd.grad(c, wrt, g)):
        assert ((o - r).norm() / r.norm()).item() < 1e-12


def test_bf16_autocast_close_to_autograd():
    block, x, g = make(32, torch.float32, drop_path=0.1, spatial=(10, 10))
    rng = torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.set_rng_state(rng)
        out = block(x)
        torch.set_rng_state(rng)
        y = lean_block.lean_block(block, x)
        torch.set_rng_state(rng)
        y_no_h = lean_block.lean_block(block, x, keep_hidden=False)
    assert torch.equal(out, y) and torch.equal(out, y_no_h)  # same kernels, same casts
    ref = torch.autograd.grad(out, [x, *block.parameters()], g)
    got = torch.autograd.grad(y, [x, *block.parameters()], g)
    for r, o in zip(ref, got):
        assert o.dtype == r.dtype
        # bf16 rounding only (the layer-scale sum and chunk order differ); fp32 gives 1e-7
        assert ((o - r).norm() / r.norm()).item() < 3e-2
    # h recomputed in backward with the forward's casts: bitwise the kept h's gradients
    got_no_h = torch.autograd.grad(y_no_h, [x, *block.parameters()], g)
    assert all(torch.equal(a, b) for a, b in zip(got, got_no_h))


def test_keeps_about_half_of_autograd():
    """What stays alive between forward and backward: x, conv output, mean/rstd and h,
    against autograd's dozen maps."""
    block, x, g = make(32, torch.float32, drop_path=0.0, spatial=(16, 16))

    def held(fn):
        with LiveBytes() as meter:
            y = fn()
        kept = meter.current
        y.backward(g)
        return kept

    auto = held(lambda: block(x))
    lean = held(lambda: lean_block.lean_block(block, x))
    # 6 (input excluded: 5) channel-sized maps against ~12: measured 0.52
    assert lean < 0.6 * auto, (lean, auto)


@pytest.mark.parametrize("channels,spatial", SHAPES)
def test_hidden_map_recomputed_in_backward(channels, spatial):
    """keep_hidden=False: pwconv1 runs again in backward; same output and gradients, and the
    hidden map (4 channel-sized maps) is not held between forward and backward."""
    block, x, g = make(channels, spatial=spatial)
    rng = torch.get_rng_state()
    out, ref_x, ref_p = autograd_grads(block, x, g, rng)
    names = [n for n, _ in block.named_parameters()]
    torch.set_rng_state(rng)
    with LiveBytes() as meter:
        y = lean_block.lean_block(block, x, keep_hidden=False)
    without_h = meter.current
    assert torch.equal(y, out)
    gx, *gp = torch.autograd.grad(y, [x, *block.parameters()], g)
    assert worst(ref_x, ref_p, gx, dict(zip(names, gp))) < 1e-12
    torch.set_rng_state(rng)
    with LiveBytes() as meter:
        y = lean_block.lean_block(block, x)  # held, like the first: the meter counts what lives when asked
    hidden_bytes = x.numel() * 4 * x.element_size()
    assert meter.current - without_h == hidden_bytes


def test_chunk_sizes_follow_the_device():
    """CPU-sized chunks on a CPU; on a GPU few large GEMMs (none where the hidden map is kept)."""
    assert lean_block.chunk_elements("cpu", kept_h=False) == lean_block.CHUNK_ELEMENTS
    assert lean_block.chunk_elements("cpu", kept_h=True) == lean_block.CHUNK_ELEMENTS_KEPT_H
    gpu = torch.device("cuda", 0)  # a device object needs no GPU
    assert lean_block.chunk_elements(gpu, kept_h=False) >= 1 << 26
    # RevCol-B's level 0 at batch 128 (401,408 tokens x 288): at most two chunks on a GPU, hundreds on a CPU
    tokens, hidden = 128 * 56 * 56, 288
    assert -(-tokens * hidden // lean_block.chunk_elements(gpu, kept_h=False)) <= 2
    assert -(-tokens * hidden // lean_block.chunk_elements("cpu", kept_h=False)) > 500
    assert lean_block.chunk_elements(gpu, kept_h=True) > tokens * hidden
