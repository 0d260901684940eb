"""RevColLoss: the published weights by hand, and its compiled arithmetic (``train.compile``)
against the eager one."""

import pytest
import torch
import torch.nn.functional as F

from revcol_dist.engine.losses import RevColLoss
from revcol_dist.models.revcol import RevColOutput
from revcol_dist.parallel.compile import compile_loss

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
CPU = torch.device("cpu")


def _output(seed: int, heads=(0, 1, 2), final: bool = True, classes: int = 7) -> RevColOutput:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, classes, generator=g).requires_grad_() if final else None
    aux = [torch.randn(4, classes, generator=g).requires_grad_() for _ in heads]
    rec = [torch.randn(4, 3, 8, 8, generator=g).requires_grad_() for _ in heads]
    return RevColOutput(logits, aux, rec, aux_index=list(heads), num_aux=3)


def _leaves(out: RevColOutput) -> list:
    return [t for t in [out.logits, *out.aux_logits, *out.reconstructions] if t is not None]


def test_terms_are_the_published_weights():
    out = _output(0)
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 3, 6, 2])
    loss, parts = RevColLoss(MEAN, STD)(out, labels, images)
    target = (images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).clamp(0.01, 0.99)
    expected = F.cross_entropy(out.logits, labels)
    for i, w_ce, w_rec in ((0, 0.175, 3.0), (1, 0.35, 2.0), (2, 0.525, 1.0)):
        ce, bce = F.cross_entropy(out.aux_logits[i], labels), F.binary_cross_entropy_with_logits(out.reconstructions[i], target)
        assert torch.allclose(parts[f"loss_cls_{i}"], ce) and torch.allclose(parts[f"loss_rec_{i}"], bce)
        expected = expected + w_ce * ce + w_rec * bce
    assert torch.allclose(loss, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="no head"):
        RevColLoss(MEAN, STD)(RevColOutput(None), labels, images)


@pytest.mark.slow  # compiles four graphs (~20 s on two cores)
@pytest.mark.parametrize("case", ["every_head_smoothed", "stage_share_soft_targets"])
def test_compiled_loss_matches_eager(case):
    """The same loss, terms and gradients (fp32 rounding) through the compiled graph: the whole
    model's heads with class indices and label smoothing, and a pipeline stage's share (no final
    head, two of three decoders) with soft targets (mixup)."""
    g = torch.Generator().manual_seed(2)
    images = torch.randn(4, 3, 8, 8, generator=g)
    if case == "every_head_smoothed":
        smoothing, heads, final, targets = 0.1, (0, 1, 2), True, torch.tensor([0, 3, 6, 2])
    else:
        smoothing, heads, final, targets = 0.0, (1, 2), False, torch.softmax(torch.randn(4, 7, generator=g), 1)
    results = []
    for compiled in (False, True):
        loss_fn = RevColLoss(MEAN, STD, smoothing)
        compile_loss(loss_fn, compiled, CPU)
        assert (loss_fn.terms is loss_fn.eager_terms) != compiled
        out = _output(3, heads, final)
        loss, parts = loss_fn(out, targets, images)
        loss.backward()
        results.append((loss.detach(), parts, [t.grad for t in _leaves(out)]))
    (eager, eager_parts, eager_grads), (comp, comp_parts, comp_grads) = results
    assert torch.allclose(comp, eager, rtol=1e-6, atol=0)
    assert comp_parts.keys() == eager_parts.keys() and len(eager_parts) == 2 * len(heads) + final
    assert all(torch.allclose(comp_parts[k], eager_parts[k], rtol=1e-6, atol=0) for k in eager_parts)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(comp_grads, eager_grads))
