import torch

from revcol_dist.models import create_model
from revcol_dist.reversible.coupling import clamp_alpha


def test_clamp_is_sign_preserving_and_functional():
    a = torch.tensor([1e-5, -1e-5, 0.5, -0.7, 0.0, 1e-3], requires_grad=True)
    c = clamp_alpha(a)
    assert torch.equal(c.detach(), torch.tensor([1e-3, -1e-3, 0.5, -0.7, 1e-3, 1e-3]))
    c.sum().backward()
    assert torch.equal(a.grad, torch.ones(6))  # straight-through: the stored value receives the update
    assert a.detach()[0] == torch.tensor(1e-5)  # the parameter itself is never edited


def test_model_forward_uses_clamped_alpha_and_leaves_parameter():
    torch.manual_seed(0)
    m = create_model("revcol_tiny", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1), num_columns=2, num_classes=3).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        m.columns[1].alpha2.fill_(1e-5)
        out_small = m.forward_features(x)
        m.columns[1].alpha2.fill_(1e-3)
        out_clamp = m.forward_features(x)
        m.columns[1].alpha2.fill_(1e-5)
    assert torch.equal(out_small[2], out_clamp[2])
    assert torch.all(m.columns[1].alpha2 == 1e-5)


def test_alphas_clamped_together_equal_each_clamped_alone():
    """``clamp_alphas`` (one pass for a column's four, or all of a segment's) is bitwise
    ``clamp_alpha`` of each, shapes kept, each gradient straight through to its own alpha."""
    from revcol_dist.reversible.coupling import clamp_alphas

    g = torch.Generator().manual_seed(0)
    alphas = [(torch.randn(1, c, 1, 1, generator=g) * 2e-3).requires_grad_() for c in (3, 5, 7, 2)]
    together = clamp_alphas(alphas)
    for a, t in zip(alphas, together):
        assert t.shape == a.shape and torch.equal(t, clamp_alpha(a))
    weights = [torch.randn(a.shape, generator=g) for a in alphas]
    sum((t * w).sum() for t, w in zip(together, weights)).backward()
    for a, w in zip(alphas, weights):
        assert torch.equal(a.grad, w)


def test_plain_forward_clamps_every_column_in_one_pass(monkeypatch):
    """Outside the reversible engine the columns' alphas are clamped together, once per forward:
    the same outputs and alpha gradients as each column clamping its own four."""
    from revcol_dist.models import revcol
    from revcol_dist.reversible import coupling

    torch.manual_seed(0)
    m = create_model("revcol_tiny", channels=(8, 8, 8, 8), layers=(1, 1, 1, 1), num_columns=3, num_classes=3).double()
    m.eval()  # no drop path: its draws come from torch's generator outside a trainer's keys
    m.reversible = False
    with torch.no_grad():
        m.columns[1].alpha2.fill_(-1e-5)  # clamped to -1e-3 either way
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    passes = []
    original = coupling._ClampAlphas.forward
    monkeypatch.setattr(coupling._ClampAlphas, "forward",
                        staticmethod(lambda ctx, *a: passes.append(len(a) - 1) or original(ctx, *a)))

    def run():
        m.zero_grad(set_to_none=True)
        out = m.forward_features(x)
        sum(o.square().sum() for o in out).backward()
        return [o.detach() for o in out], [c.alpha2.grad.clone() for c in m.columns]

    together = run()
    assert passes == [12]  # three columns' four alphas, one pass
    monkeypatch.setattr(revcol, "column_alphas", lambda cols: None)  # each column its own
    passes.clear()
    alone = run()
    assert passes == [4, 4, 4]
    for a, b in zip(together[0] + together[1], alone[0] + alone[1]):
        assert torch.equal(a, b)
