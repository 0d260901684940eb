"""Reversible gradients against plain autograd on the same weights, inputs and RNG."""

import pytest
import torch
import torch.nn.functional as F

from revcol_dist.models import create_model

SMALL = dict(channels=(16, 24, 32, 40), layers=(1, 1, 2, 1), num_classes=7, drop_path=0.2)


def build(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    args = dict(SMALL)
    args.update(kw)
    return create_model("revcol_tiny", **args).to(dtype).train()


def loss_of(out, labels):
    loss = F.cross_entropy(out.logits, labels)
    for a in out.aux_logits:
        loss = loss + F.cross_entropy(a, labels)
    for r in out.reconstructions:
        loss = loss + r.square().mean()
    return loss


def grads(model, x, labels, reversible, seed=1):
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same drop-path masks in both runs
    loss = loss_of(model(x), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def worst_relative_error(ga, gb):
    assert ga.keys() == gb.keys()
    worst = 0.0
    for n in ga:
        ref = ga[n]
        assert gb[n] is not None, n
        denom = ref.norm().item()
        diff = (ga[n] - gb[n]).norm().item()
        if denom == 0.0:
            assert diff == 0.0, n
            continue
        worst = max(worst, diff / denom)
    return worst


def rev_vs_plain(m, dtype=torch.float64, labels=(1, 4)):
    """Worst per-parameter relative gradient error, reversible vs plain, on one batch."""
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    labels = torch.tensor(labels)
    _, gp = grads(m, x, labels, False)
    _, gr = grads(m, x, labels, True)
    return worst_relative_error(gp, gr)


def _check(dtype, tol, inter_supv, k, alpha=None, **kw):
    m = build(dtype, inter_supv=inter_supv, boundary_interval=k, **kw)
    if alpha is not None:
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".alpha" in n:
                    p.fill_(alpha)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    labels = torch.tensor([1, 4])
    l_plain, g_plain = grads(m, x, labels, False)
    l_rev, g_rev = grads(m, x, labels, True)
    assert torch.equal(l_plain, l_rev)  # the forward is the same computation
    assert all(g is not None for g in g_rev.values())
    err = worst_relative_error(g_plain, g_rev)
    assert err < tol, err
    return m


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("inter_supv", [False, True])
def test_fp32_matches_plain_autograd(inter_supv, k):
    _check(torch.float32, 1e-5, inter_supv, k)


@pytest.mark.parametrize("inter_supv", [False, True])
def test_fp32_only_outputs_kept(inter_supv):
    # Two columns reconstructed in a row (the last column runs with ordinary autograd), level 3
    # kept (RevCol-T's registered default). Measured over 8 inputs: 3.1e-6 .. 5.7e-6.
    _check(torch.float32, 1e-5, inter_supv, None)


@pytest.mark.parametrize("inter_supv", [False, True])
def test_fp32_only_outputs_kept_every_level_reconstructed(inter_supv):
    # keep_levels=(): level 3 reconstructed too. Measured over 8 inputs: 5.1e-6 .. 1.33e-5, the
    # rounding of the fp32 forward's c = alpha*c' + f amplified by two inversions in a row.
    _check(torch.float32, 2e-5, inter_supv, None, keep_levels=())


@pytest.mark.parametrize("k", [1, 2, None])
@pytest.mark.parametrize("inter_supv", [False, True])
def test_fp64_matches_plain_autograd(inter_supv, k):
    _check(torch.float64, 1e-10, inter_supv, k)


def test_small_alpha_kept_not_reconstructed():
    # At alpha = 0.05 reconstruction would amplify rounding 20x per level; the policy keeps.
    _check(torch.float32, 1e-4, True, None, alpha=0.05)


def test_alpha_below_clamp():
    m = build(torch.float64, inter_supv=True)
    with torch.no_grad():
        m.columns[2].alpha1.fill_(1e-5)
    assert rev_vs_plain(m, labels=(0, 3)) < 1e-10


def test_autograd_grad_equals_backward():
    m = build(inter_supv=True, boundary_interval=2)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    labels = torch.tensor([2, 5])
    params = [p for _, p in m.named_parameters()]
    torch.manual_seed(3)
    loss = loss_of(m(x), labels)
    g_fn = torch.autograd.grad(loss, params + [x])
    assert all(g is not None for g in g_fn)
    m.zero_grad(set_to_none=True)
    x.grad = None
    torch.manual_seed(3)
    loss_of(m(x), labels).backward()
    for p, g in zip(params + [x], g_fn):
        assert torch.equal(p.grad, g)


def test_input_gradient_matches():
    m = build(torch.float64, inter_supv=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    out = []
    for rev in (False, True):
        m.reversible = rev
        x.grad = None
        torch.manual_seed(1)
        loss_of(m(x), torch.tensor([0, 1])).backward()
        out.append(x.grad.clone())
    assert ((out[0] - out[1]).norm() / out[0].norm()).item() < 1e-10


def test_drift_is_measured_at_kept_boundaries():
    m = build(boundary_interval=1, min_reconstruct_alpha=0.0)
    x = torch.randn(2, 3, 64, 64)
    loss_of(m(x), torch.tensor([0, 1])).backward()
    assert m.drift.boundaries_checked > 0
    assert 0.0 < m.drift.last_drift < 1e-5
    m64 = build(torch.float64, boundary_interval=1, min_reconstruct_alpha=0.0)
    loss_of(m64(x.double()), torch.tensor([0, 1])).backward()
    assert m64.drift.last_drift < 1e-13


@pytest.mark.parametrize("keep_levels", [(), (3,)])
def test_offloaded_boundaries_give_same_gradients(keep_levels, monkeypatch):
    """And each offloaded boundary comes back once, however often the backward reads it."""
    from revcol_dist.reversible import function, offload

    made = []

    class Counting(offload.Offloader):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(function, "Offloader", Counting)
    m = build(boundary_interval=1, keep_levels=keep_levels)
    x = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([1, 2])
    _, g_ref = grads(m, x, labels, True)
    m.policy = type(m.policy)(**{**m.policy.__dict__, "offload_boundaries": True})
    _, g_off = grads(m, x, labels, True)
    for n in g_ref:
        assert torch.equal(g_ref[n], g_off[n]), n
    off = made[-1]
    assert off.enabled and off.bytes_offloaded > 0
    assert off.bytes_fetched == off.bytes_offloaded  # one copy back per boundary


def test_offloaded_channels_last_boundaries_come_back_channels_last():
    """The host copy keeps the layout: fetched back in another one, the recomputation would run
    other kernels than the forward (on an H200 the gradients then differed by 1.06e-6)."""
    from revcol_dist.reversible.offload import Offloader

    t = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    off = Offloader(True, t.device)
    back = off.fetch(off.stash(t))
    assert back.stride() == t.stride() and torch.equal(back, t)
    m = build(boundary_interval=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([1, 2])
    _, g_ref = grads(m, x, labels, True)
    m.policy = type(m.policy)(**{**m.policy.__dict__, "offload_boundaries": True})
    _, g_off = grads(m, x, labels, True)
    for n in g_ref:
        assert torch.equal(g_ref[n], g_off[n]), n


def test_bf16_autocast_replay():
    """Under bf16 autocast the reversible gradients are as close to fp32 as plain autograd's."""
    m = build(inter_supv=True, boundary_interval=2)
    x = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([1, 2])
    _, ref = grads(m, x, labels, False)
    res = []
    for rev in (False, True):
        m.reversible = rev
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
            feats = m.forward_features(x)
        assert out.logits.dtype == torch.bfloat16
        assert all(f.dtype == torch.float32 for f in feats)  # residual stream stays fp32
        loss_of(out, labels).float().backward()
        res.append({n: p.grad.float().clone() for n, p in m.named_parameters()})
    plain_err = worst_relative_error(ref, res[0])
    rev_err = worst_relative_error(ref, res[1])
    assert plain_err > 1e-4  # bf16 really was used
    assert rev_err < 1.5 * plain_err, (rev_err, plain_err)


@pytest.mark.parametrize("k", [2, None])
def test_lean_mode_recomputes_last_column_too(k):
    m = build(torch.float64, inter_supv=True, boundary_interval=k, plain_columns=0)
    assert rev_vs_plain(m) < 1e-10


def test_partial_use_of_features():
    """Only c0 of the last column used: every node still runs and reconstructs."""
    for keep_last in (True, False):
        m = build(torch.float64, plain_columns=int(keep_last))
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        res = []
        for rev in (False, True):
            m.reversible = rev
            m.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            m.forward_features(x)[0].square().mean().backward()
            res.append({n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in m.named_parameters()})
        assert worst_relative_error(res[0], res[1]) < 1e-10


@pytest.mark.parametrize("kw,why", [(dict(plain_columns=0, keep_levels=()), "never reconstructed"),
                                    (dict(), "freed by an earlier backward")])
def test_second_backward_is_explained(kw, why):
    m = build(**kw)
    out = m.forward_features(torch.randn(1, 3, 64, 64))
    loss = out[3].sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=why):
        loss.backward()


@pytest.mark.parametrize("inter_supv", [False, True])
def test_block_granular_recompute(inter_supv):
    # drop path on: each block's RNG state is replayed in the block-by-block pass
    _check(torch.float64, 1e-10, inter_supv, 2)
    m = build(torch.float64, inter_supv=inter_supv, recompute="block", plain_columns=0, boundary_interval=None)
    assert rev_vs_plain(m) < 1e-10


def test_block_recompute_fp32():
    m = build(torch.float32, inter_supv=True, recompute="block", boundary_interval=2)
    assert rev_vs_plain(m, torch.float32) < 1e-5


@pytest.mark.parametrize("plain_columns", [2, 4])
def test_more_plain_columns(plain_columns):
    m = build(torch.float64, inter_supv=True, plain_columns=plain_columns)
    assert rev_vs_plain(m) < 1e-10


@pytest.mark.parametrize("k", [2, None])
def test_huge_topology_level0_up2_fp64(k):
    """RevCol-H's extra level-0 branch from the previous column's level 3, 8 columns, drop path on."""
    torch.manual_seed(0)
    m = create_model("revcol_huge", channels=(8, 8, 16, 16), layers=(1, 1, 2, 1), num_classes=7, inter_supv=True,
                     drop_path=0.2, boundary_interval=k).double().train()
    assert m.config.level0_up2 and m.config.num_columns == 8
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    labels = torch.tensor([1, 4])
    la, ga = grads(m, x, labels, reversible=False)
    lb, gb = grads(m, x, labels, reversible=True)
    assert torch.equal(la, lb)
    assert worst_relative_error(ga, gb) < 1e-10


@pytest.mark.parametrize("recompute", ["level", "block"])
def test_autograd_block_backward_still_exact(recompute):
    """lean_blocks=False: blocks backpropagated by autograd through the recomputed graph."""
    m = build(torch.float64, inter_supv=True, lean_blocks=False, recompute=recompute, plain_columns=1)
    assert rev_vs_plain(m) < 1e-10


def test_against_plain_autograd_with_nothing_recomputed():
    """Reversible (lean blocks, staged decoder and stem recomputation) against a model that
    stores every activation (heads not checkpointed either)."""
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    labels = torch.tensor([1, 4])
    plain = build(torch.float64, inter_supv=True, checkpoint_heads=False)
    _, gp = grads(plain, x, labels, False)
    for recompute in ("level", "block"):
        rev = build(torch.float64, inter_supv=True, recompute=recompute, plain_columns=1)
        _, gr = grads(rev, x, labels, True)
        assert worst_relative_error(gp, gr) < 1e-10


@pytest.mark.parametrize("keep_levels", [(3,), (2, 3), (0,), (1, 3)])
@pytest.mark.parametrize("k", [2, None])
def test_kept_levels_exact(keep_levels, k):
    """Levels run with ordinary autograd inside the reversible columns (their neighbours read
    them kept, never reconstructed)."""
    m = build(torch.float64, inter_supv=True, boundary_interval=k, keep_levels=keep_levels)
    assert rev_vs_plain(m) < 1e-10


def test_kept_levels_fp32_and_block_mode():
    m = build(torch.float32, inter_supv=True, keep_levels=(2, 3), recompute="block", plain_columns=0)
    assert rev_vs_plain(m, torch.float32) < 1e-5


@pytest.mark.parametrize("recompute_hidden,keep_levels,plain_columns", [
    ((0,), (3,), 1), ((0, 1, 2, 3), (), 2), ((3,), (3,), 0), ((0, 2), (1, 2), 1)])
def test_recomputed_hidden_maps_exact(recompute_hidden, keep_levels, plain_columns):
    """Blocks whose activations are kept (plain columns, kept levels) without their hidden map."""
    m = build(torch.float64, inter_supv=True, keep_levels=keep_levels, plain_columns=plain_columns,
              recompute_hidden=recompute_hidden)
    assert rev_vs_plain(m) < 1e-10


def test_bad_keep_levels_is_a_clear_error():
    with pytest.raises(ValueError, match="keep_levels"):
        build(keep_levels=(4,))
    with pytest.raises(ValueError, match="recompute_hidden must be levels 0..3"):
        build(recompute_hidden=(0, -1))
