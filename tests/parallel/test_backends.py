"""The backend contract in one process: forward_backward over micro-batches accumulates the
gradients of the whole batch, in the memory of one micro-batch; step clips and skips."""

import pytest
import torch

from revcol_dist.engine.losses import RevColLoss
from revcol_dist.engine.optim import make_optimizer
from revcol_dist.models import create_model
from revcol_dist.monitor.live_bytes import LiveBytes
from revcol_dist.parallel.backends import LocalBackend
from revcol_dist.parallel.distributed import DistInfo

LOSS = RevColLoss((0.5,) * 3, (0.25,) * 3)


def _backend(clip=None):
    torch.manual_seed(0)
    model = create_model("revcol_mini", num_classes=10, inter_supv=True)
    return LocalBackend(model, DistInfo(0, 1, 0), lambda m: make_optimizer(m, "sgd", 0.0), torch.device("cpu"),
                        clip_grad=clip)


def _batch(n=16, res=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, res, res, generator=g), torch.randint(0, 10, (n,), generator=g)


def _micro(images, labels, k):
    return list(zip(images.chunk(k), labels.chunk(k)))


def test_accumulated_micro_batches_equal_the_whole_batch_in_less_memory():
    images, labels = _batch()
    grads, peaks, losses = {}, {}, {}
    for k in (1, 4):
        b = _backend()
        b.forward_backward(_micro(images, labels, k), LOSS)  # gradient buffers exist before the meter
        for p in b.model.parameters():
            p.grad = None
        with LiveBytes() as meter:
            out = b.forward_backward(_micro(images, labels, k), LOSS)
        peaks[k], losses[k] = meter.peak, float(out.loss)
        grads[k] = {n: p.grad.clone() for n, p in b.model.named_parameters()}
        assert set(out.parts) == {"loss_cls_final"} | {f"loss_{t}_{i}" for i in range(3) for t in ("cls", "rec")}
    assert losses[4] == pytest.approx(losses[1], rel=1e-6)
    worst = max((grads[4][n] - g).norm() / g.norm().clamp_min(1e-12) for n, g in grads[1].items())
    assert worst < 1e-5
    # activations of a quarter of the batch (the gradients themselves count in both)
    assert peaks[4] < 0.6 * peaks[1], peaks


def test_step_clips_by_the_global_norm_and_skips_non_finite_gradients():
    images, labels = _batch(4, 32)
    b = _backend(clip=0.01)
    b.forward_backward(_micro(images, labels, 1), LOSS)
    before = {n: p.detach().clone() for n, p in b.model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in b.model.named_parameters()}
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    assert b.step(lr=1.0)
    assert float(b.last_grad_norm) == pytest.approx(float(norm), rel=1e-5)
    for n, p in b.model.named_parameters():  # SGD's first step moves by lr * clipped gradient
        assert torch.allclose(before[n] - p.detach(), grads[n] * 0.01 / (float(norm) + 1e-6), atol=1e-7)
        assert p.grad is None
    b.forward_backward(_micro(images, labels, 1), lambda out, t, x: (LOSS(out, t, x)[0] * float("nan"), {}))
    kept = {n: p.detach().clone() for n, p in b.model.named_parameters()}
    assert not b.step(lr=1.0)
    assert all(torch.equal(kept[n], p) for n, p in b.model.named_parameters())


def test_zero3_fetches_each_block_fusion_and_head_whole():
    """Under ZeRO-3 DeepSpeed hooks the ConvNeXt blocks, fusions and heads as wholes (leaf
    modules), not their every sub-module: one gather each (the launchers' ZeRO-3 runs check that
    nothing else changes)."""
    from revcol_dist.models.column import Fusion
    from revcol_dist.models.heads import Classifier
    from revcol_dist.models.layers import ConvNeXtBlock
    from revcol_dist.parallel.backends import fetch_whole_blocks

    model = create_model("revcol_tiny", channels=[8, 16, 24, 32], layers=[1, 1, 1, 1], num_columns=2,
                         num_classes=10, inter_supv=True)
    whole = [m for m in model.modules() if isinstance(m, (ConvNeXtBlock, Fusion, Classifier))]
    assert fetch_whole_blocks(model) == len(whole) > 2 * 4
    assert all(getattr(m, "_z3_leaf", False) for m in whole)
    others = [m for m in model.modules() if not isinstance(m, (ConvNeXtBlock, Fusion, Classifier))]
    assert not any(getattr(m, "_z3_leaf", False) for m in others)
