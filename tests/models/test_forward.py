import pytest
import torch

from revcol_dist.models import RevColOutput, create_model

from .published_reference import published_forward

SMALL = dict(channels=(16, 24, 32, 40), layers=(1, 1, 2, 1), drop_path=0.0, num_classes=7)


def small_model(**kw):
    args = dict(SMALL)
    args.update(kw)
    return create_model("revcol_tiny", **args)


def _close(a, b, tol):
    assert a.shape == b.shape
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    assert err < tol, err


@pytest.mark.parametrize("inter_supv", [False, True])
@pytest.mark.parametrize("reversible", [False, True])
@pytest.mark.parametrize("variant", ["plain", "huge", "sim_decoder"])
def test_matches_published_math(variant, reversible, inter_supv):
    torch.manual_seed(0)
    kw = {"huge": dict(level0_up2=True), "sim_decoder": dict(num_classes=1001), "plain": {}}[variant]
    m = small_model(inter_supv=inter_supv, reversible=reversible, **kw).double().train()
    # Give alphas and layer scales non-trivial values so every branch matters.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("gamma") or ".alpha" in n:
                p.uniform_(0.3, 1.0)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    cls_ref, img_ref, _ = published_forward(m, x)
    out = m(x)
    assert isinstance(out, RevColOutput)
    _close(out.logits, cls_ref[-1], 1e-12)
    assert len(out.aux_logits) == len(cls_ref) - 1
    for a, b in zip(out.aux_logits, cls_ref[:-1]):
        _close(a, b, 1e-12)
    assert len(out.reconstructions) == len(img_ref)
    for a, b in zip(out.reconstructions, img_ref):
        _close(a, b, 1e-12)


def test_forward_features_are_last_column_maps():
    torch.manual_seed(0)
    m = small_model().double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    _, _, c = published_forward(m, x)
    feats = m.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(1, 16, 16, 16), (1, 24, 8, 8), (1, 32, 4, 4), (1, 40, 2, 2)]
    for a, b in zip(feats, c):
        _close(a, b, 1e-12)


def test_eval_returns_only_final_head():
    m = small_model(inter_supv=True).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 7) and out.aux_logits == [] and out.reconstructions == []


@pytest.mark.parametrize("hw", [(100, 76), (67, 97), (33, 200), (224, 224)])
@pytest.mark.parametrize("reversible", [False, True])
def test_any_input_size(hw, reversible):
    m = small_model(inter_supv=True, reversible=reversible).train()
    x = torch.randn(2, 3, *hw, requires_grad=True)
    out = m(x)
    assert out.logits.shape == (2, 7)
    assert len(out.aux_logits) == 3 and all(a.shape == (2, 7) for a in out.aux_logits)
    assert len(out.reconstructions) == 3 and all(r.shape == (2, 3, *hw) for r in out.reconstructions)
    loss = out.logits.sum() + sum(r.mean() for r in out.reconstructions)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_feature_strides_on_odd_sizes():
    m = small_model().eval()
    with torch.no_grad():
        feats = m.forward_features(torch.randn(1, 3, 100, 76))
    assert [tuple(f.shape[-2:]) for f in feats] == [(25, 19), (12, 9), (6, 4), (3, 2)]


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 1, 64, 64), (3, 64, 64)])
def test_bad_input_shape_is_explained(shape):
    m = small_model().eval()
    with pytest.raises(ValueError, match="RevCol"):
        m(torch.randn(*shape))


def test_head_init_scale():
    torch.manual_seed(0)
    a = small_model()
    torch.manual_seed(0)
    b = small_model(head_init_scale=0.001)
    wa, wb = a.heads[0].classifier[1].weight, b.heads[0].classifier[1].weight
    assert torch.allclose(wb, wa * 0.001)


def test_published_init():
    torch.manual_seed(0)
    m = create_model("revcol_tiny")
    w = m.columns[1].level2.blocks[0].pwconv1.weight
    assert abs(w.std().item() - 0.02) < 1e-3
    assert m.columns[1].level2.blocks[0].pwconv1.bias.abs().max() == 0
    assert torch.all(m.columns[1].level2.blocks[0].gamma == 1e-6)
    assert torch.all(m.columns[3].alpha2 == 0.5)
    assert torch.all(m.stem[1].weight == 1) and torch.all(m.stem[1].bias == 0)
