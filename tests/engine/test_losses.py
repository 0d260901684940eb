"""RevColLoss: the published weights by hand, and its compiled arithmetic (``train.compile``)
against the eager one."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from revcol_dist.engine.losses import RevColLoss
from revcol_dist.models.revcol import RevColOutput
from revcol_dist.parallel.compile import compile_loss

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
CPU = torch.device("cpu")


def _output(seed: int, heads=(0, 1, 2), final: bool = True, classes: int = 7, dtype=torch.float32) -> RevColOutput:
    g = torch.Generator().manual_seed(seed)
    leaf = lambda *shape: torch.randn(*shape, generator=g).to(dtype).requires_grad_()  # noqa: E731
    logits = leaf(4, classes) if final else None
    aux = [leaf(4, classes) for _ in heads]
    rec = [leaf(4, 3, 8, 8) for _ in heads]
    return RevColOutput(logits, aux, rec, aux_index=list(heads), num_aux=3)


def _leaves(out: RevColOutput) -> list:
    return [t for t in [out.logits, *out.aux_logits, *out.reconstructions] if t is not None]


def test_terms_are_the_published_weights():
    """By hand: the weights of the paper's four heads, label smoothing, and a pipeline's two
    stages (head 0; heads 1, 2 and the final one), whose shares sum to the whole loss."""
    out = _output(0)
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 3, 6, 2])
    loss, parts = RevColLoss(MEAN, STD, label_smoothing=0.1)(out, labels, images)
    target = (images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).clamp(0.01, 0.99)
    ce = lambda logits: F.cross_entropy(logits, labels, label_smoothing=0.1)  # noqa: E731
    expected = ce(out.logits)
    for i, w_ce, w_rec in ((0, 0.175, 3.0), (1, 0.35, 2.0), (2, 0.525, 1.0)):
        bce = F.binary_cross_entropy_with_logits(out.reconstructions[i], target)
        assert torch.allclose(parts[f"loss_cls_{i}"], ce(out.aux_logits[i])) and torch.allclose(parts[f"loss_rec_{i}"], bce)
        expected = expected + w_ce * ce(out.aux_logits[i]) + w_rec * bce
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert all(not p.requires_grad for p in parts.values())
    first = RevColOutput(None, out.aux_logits[:1], out.reconstructions[:1], aux_index=[0], num_aux=3)
    rest = RevColOutput(out.logits, out.aux_logits[1:], out.reconstructions[1:], aux_index=[1, 2], num_aux=3)
    shares = [RevColLoss(MEAN, STD, label_smoothing=0.1)(o, labels, images)[0] for o in (first, rest)]
    assert torch.allclose(shares[0] + shares[1], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="no head"):
        RevColLoss(MEAN, STD)(RevColOutput(None), labels, images)


@pytest.mark.slow  # compiles four graphs (~20 s on two cores)
@pytest.mark.parametrize("case", ["every_head_smoothed", "stage_share_soft_targets_bf16"])
def test_compiled_loss_matches_eager(case):
    """The same loss, terms and gradients (fp32 rounding) through compiled graphs: the whole
    model's heads with class indices and label smoothing; and under bf16 autocast, as training
    calls it, a pipeline stage's share (no final head, two of three decoders) with soft targets
    (mixup)."""
    g = torch.Generator().manual_seed(2)
    images = torch.randn(4, 3, 8, 8, generator=g)
    if case == "every_head_smoothed":
        smoothing, heads, final, dtype, targets = 0.1, (0, 1, 2), True, torch.float32, torch.tensor([0, 3, 6, 2])
    else:
        smoothing, heads, final, dtype = 0.0, (1, 2), False, torch.bfloat16
        targets = torch.softmax(torch.randn(4, 7, generator=g), 1)
    results = []
    for compiled in (False, True):
        loss_fn = RevColLoss(MEAN, STD, smoothing)
        compile_loss(loss_fn, compiled, CPU)
        assert (loss_fn.terms is loss_fn.eager_terms) != compiled
        graphs = counters["stats"]["unique_graphs"]
        out = _output(3, heads, final, dtype=dtype)
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss, parts = loss_fn(out, targets, images)
        loss.backward()
        assert counters["stats"]["unique_graphs"] == graphs + compiled  # compiled: one graph, not eager
        results.append((loss.detach(), parts, [t.grad for t in _leaves(out)]))
    (eager, eager_parts, eager_grads), (comp, comp_parts, comp_grads) = results
    assert comp.dtype == torch.float32 and torch.allclose(comp, eager, rtol=1e-6, atol=0)
    assert comp_parts.keys() == eager_parts.keys() and len(eager_parts) == 2 * len(heads) + final
    assert all(torch.allclose(comp_parts[k], eager_parts[k], rtol=1e-6, atol=0) for k in eager_parts)
    rtol = 1e-5 if dtype == torch.float32 else 1e-2  # gradients of bf16 leaves are rounded to bf16
    assert all(a.dtype == dtype and torch.allclose(a, b, rtol=rtol, atol=1e-8) for a, b in zip(comp_grads, eager_grads))
