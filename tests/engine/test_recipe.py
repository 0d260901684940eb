"""Each recipe piece against a hand computation: LR schedule, layer-decay groups, loss weights,
EMA, mixup/cutmix targets."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from revcol_dist.data.mixup import Mixup, smooth_one_hot
from revcol_dist.engine.ema import ModelEMA
from revcol_dist.engine.losses import revcol_loss
from revcol_dist.engine.optim import layer_id, make_optimizer, param_groups
from revcol_dist.parallel.backends import set_lr
from revcol_dist.engine.schedule import lr_at
from revcol_dist.models import create_model
from revcol_dist.models.revcol import RevColOutput


def test_lr_with_warmup_lr_and_batch_scaling_by_hand():
    # published T: base 1e-3, warmup_lr 1e-5, min 1e-6, at global batch 4096 -> x4
    s = 4096 / 1024
    base, wlr, mn = 1e-3 * s, 1e-5 * s, 1e-6 * s
    assert lr_at(0, 1000, 100, base, mn, wlr) == pytest.approx(4e-5)
    assert lr_at(50, 1000, 100, base, mn, wlr) == pytest.approx(4e-5 + (4e-3 - 4e-5) * 0.5)
    assert lr_at(100, 1000, 100, base, mn, wlr) == pytest.approx(4e-3)
    # cosine half-way through the post-warm-up span: the mean of base and min
    assert lr_at(550, 1000, 100, base, mn, wlr) == pytest.approx((4e-3 + 4e-6) / 2)
    assert lr_at(1000, 1000, 100, base, mn, wlr) == pytest.approx(4e-6)


def test_layer_ids_by_hand():
    layers, cols = (1, 2, 6, 2), 8  # RevCol-L/XL/H: 11 blocks per column, num_layers = 19
    assert layer_id("stem.0.weight", layers, cols) == 0
    assert layer_id("subnet0.alpha0", layers, cols) == 1
    assert layer_id("subnet7.alpha3", layers, cols) == 8
    assert layer_id("subnet0.level0.blocks.0.dwconv.weight", layers, cols) == 1
    assert layer_id("subnet2.level2.blocks.4.pwconv1.weight", layers, cols) == (1 + 2 + 4) + 2 + 1
    assert layer_id("subnet2.level2.fusion.down.0.weight", layers, cols) == 3 + 2 + 1
    assert layer_id("subnet3.level1.fusion.up.channel_reschedule.0.weight", layers, cols) == 1 + 3 + 1
    assert layer_id("subnet7.level3.blocks.1.gamma", layers, cols) == 10 + 7 + 1
    assert layer_id("cls.classifier.1.weight", layers, cols) == 19
    assert layer_id("decoder_blocks.0.projback.0.weight", layers, cols) == 19
    # RevCol-B has 16 columns: the whole index counts (the published code read only its last digit)
    assert layer_id("subnet12.alpha0", (1, 1, 3, 2), 16) == 13


def test_layer_decay_groups_and_lrs():
    m = create_model("revcol_tiny", channels=[8, 8, 8, 8], layers=[1, 1, 2, 1], num_columns=3, num_classes=10,
                     inter_supv=True)
    groups = param_groups(m, weight_decay=0.05, layer_decay=0.5)
    top = 5 + 3
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["stem.0.weight"]["lr_scale"] == 0.5 ** top and by_name["stem.0.weight"]["weight_decay"] == 0.05
    assert by_name["stem.0.bias"]["weight_decay"] == 0.0  # 1-D: no decay
    assert by_name["columns.1.alpha2"]["lr_scale"] == 0.5 ** (top - 2)
    assert by_name["columns.1.alpha2"]["weight_decay"] == 0.05  # alpha is (1, C, 1, 1), as published
    assert by_name["columns.2.level3.blocks.0.pwconv1.weight"]["lr_scale"] == 0.5 ** (top - (4 + 2 + 1))
    assert by_name["heads.0.classifier.1.weight"]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    opt = make_optimizer(m, "adamw", 0.05, 0.5)
    set_lr(opt, 1e-3)
    lrs = {g["layer_id"]: g["lr"] for g in opt.param_groups}
    assert lrs[0] == pytest.approx(1e-3 * 0.5 ** 8) and lrs[8] == pytest.approx(1e-3)
    # off: a single scale for everything
    assert {g["lr_scale"] for g in param_groups(m, 0.05, 1.0)} == {1.0}


def _adamw_by_hand(params, grads_per_step, lrs, wds, beta1=0.9, beta2=0.999, eps=1e-8):
    """AdamW written out in float64 (decoupled decay, bias-corrected moments)."""
    ps = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            g = g.double()
            ps[i] *= 1 - lrs[i] * wds[i]
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            mhat, vhat = m[i] / (1 - beta1 ** t), v[i] / (1 - beta2 ** t)
            ps[i] -= lrs[i] * mhat / (vhat.sqrt() + eps)
    return ps


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_over_layer_decay_groups_equals_adamw_by_hand(fused):
    """The trainer's optimizer (torch's fused AdamW, one kernel per group) steps every group
    with its own LR and decay, as AdamW written out by hand does."""
    torch.manual_seed(0)
    m = create_model("revcol_tiny", channels=[8, 8, 8, 8], layers=[1, 1, 2, 1], num_columns=3, num_classes=10)
    opt = make_optimizer(m, "adamw", 0.05, 0.5, fused=fused)
    assert all(g.get("fused") is (True if fused else None) for g in opt.param_groups)
    params = [p for g in opt.param_groups for p in g["params"]]
    set_lr(opt, 1e-2)
    lrs = [g["lr"] for g in opt.param_groups for _ in g["params"]]
    wds = [g["weight_decay"] for g in opt.param_groups for _ in g["params"]]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    want = _adamw_by_hand(params, grads, lrs, wds)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    worst = max(float((p.detach().double() - w).abs().max() / w.abs().max().clamp_min(1e-12)) for p, w in zip(params, want))
    assert worst < 1e-6, worst
    # the step counts live with the parameters (fused: no host read per step)
    steps = [opt.state[p]["step"] for p in params]
    assert all(float(s) == 3 for s in steps)


def test_portable_step_count_keeps_its_device_and_dtype():
    """A resume sets the step count in place of the optimizer's own tensor: a fused optimizer
    keeps it on the parameter's device (a CPU tensor there would stop it); here a float64
    count stands for a tensor the CPU-made one would not match."""
    from revcol_dist.parallel.portable_state import set_optimizer_steps, optimizer_steps

    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for state in opt.state.values():
        state["step"] = state["step"].double()
    set_optimizer_steps(opt, 41)
    assert all(s["step"].dtype == torch.float64 and float(s["step"]) == 41 for s in opt.state.values())
    assert optimizer_steps(opt) == 41


def test_intermediate_supervision_loss_weights_by_hand():
    torch.manual_seed(0)
    n, c, h = 4, 10, 8
    logits = [torch.randn(n, c) for _ in range(4)]
    recs = [torch.randn(n, 3, h, h) for _ in range(3)]
    labels = torch.randint(0, c, (n,))
    images = torch.randn(n, 3, h, h)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = RevColOutput(logits=logits[-1], aux_logits=logits[:3], reconstructions=recs)
    loss, parts = revcol_loss(out, labels, images, mean, std, label_smoothing=0.1)
    target = (images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0.01, 0.99)
    want = F.cross_entropy(logits[3], labels, label_smoothing=0.1)
    for i, (wc, wr) in enumerate(zip((0.175, 0.35, 0.525), (3.0, 2.0, 1.0))):
        want = want + wc * F.cross_entropy(logits[i], labels, label_smoothing=0.1)
        want = want + wr * F.binary_cross_entropy_with_logits(recs[i], target)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    # soft targets (mixup) go through the same loss
    soft = smooth_one_hot(labels, c, 0.1)
    loss_soft, _ = revcol_loss(out, soft, images, mean, std)
    assert loss_soft.item() == pytest.approx(loss.item(), rel=1e-6)


def test_ema_update_by_hand():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = ModelEMA(lin, decay=0.9)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0]]))
    ema.update()  # 0.9 * [1, 2] + 0.1 * [3, 0]
    assert torch.allclose(ema.shadow[0], torch.tensor([[1.2, 1.8]]))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.0]]))
    ema.update()
    assert torch.allclose(ema.shadow[0], torch.tensor([[1.08, 1.62]]))
    with ema.applied():
        assert torch.allclose(lin.weight, torch.tensor([[1.08, 1.62]]))
    assert torch.equal(lin.weight, torch.zeros(1, 2))  # restored
    other = ModelEMA(lin, 0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow[0], ema.shadow[0]) and other.updates == 2


def test_mixup_by_hand():
    mix = Mixup(num_classes=3, mixup=0.8, cutmix=0.0, prob=1.0, smoothing=0.1, seed=7)
    lam, box = mix.params(step=5, h=4, w=4)
    rng = np.random.default_rng([7, 5, 0x6D6978])
    rng.random()  # the apply-or-not draw
    want_lam = float(rng.beta(0.8, 0.8))
    assert box is None and lam == pytest.approx(want_lam)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    y = torch.tensor([0, 2])
    xm, t = mix(x, y, step=5)
    assert torch.allclose(xm[0], lam * x[0] + (1 - lam) * x[1])
    # targets: smoothed one-hots (0.1/3 off, 1-0.1+0.1/3 on), mixed with the partner's
    off, on = 0.1 / 3, 0.9 + 0.1 / 3
    assert torch.allclose(t[0], torch.tensor([lam * on + (1 - lam) * off, off, lam * off + (1 - lam) * on]))
    assert torch.allclose(t.sum(1), torch.ones(2))


def test_cutmix_pastes_a_box_and_weights_by_its_area():
    mix = Mixup(num_classes=2, mixup=0.0, cutmix=1.0, prob=1.0, smoothing=0.0, seed=1)
    for step in range(20):
        lam, box = mix.params(step, 8, 8)
        y0, y1, x0, x1 = box
        assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 64)
    x = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    xm, t = mix(x, torch.tensor([0, 1]), step=3)
    lam, _ = mix.params(3, 8, 8)
    assert xm[0].mean().item() == pytest.approx(1 - lam)  # the pasted fraction comes from sample 1
    assert torch.allclose(t[0], torch.tensor([lam, 1 - lam]))
    with pytest.raises(ValueError, match="even"):
        mix(torch.zeros(3, 3, 8, 8), torch.zeros(3, dtype=torch.long), 0)


def test_mixup_is_the_same_on_any_split_of_the_global_batch():
    """Adjacent pairs and one draw per step: two ranks' halves (or four micro-batches) mix
    exactly the pixels and targets one process does."""
    mix = Mixup(num_classes=5, mixup=0.8, cutmix=1.0, prob=1.0, switch_prob=0.5, smoothing=0.1, seed=3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
    kinds = set()
    for step in range(12):
        whole = mix(x, y, step)
        for parts in (2, 4):
            split = [mix(xp, yp, step) for xp, yp in zip(x.chunk(parts), y.chunk(parts))]
            assert torch.equal(whole[0], torch.cat([s[0] for s in split]))
            assert torch.equal(whole[1], torch.cat([s[1] for s in split]))
        kinds.add(mix.params(step, 16, 16)[1] is None)
    assert kinds == {True, False}  # both mixup and cutmix steps were checked
