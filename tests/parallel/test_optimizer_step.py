"""The optimizer step whose skip is decided on the device (``parallel/optimizer_step.py``)."""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from revcol_dist.engine.optim import make_optimizer, param_groups
from revcol_dist.models import create_model
from revcol_dist.parallel.backends import set_lr
from revcol_dist.parallel.optimizer_step import fused_adamw_step, skips_in_kernel

NARROW = dict(channels=[8, 8, 8, 8], layers=[1, 1, 2, 1], num_columns=3, num_classes=10)


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_a_step_skipped_on_the_device_leaves_everything_as_torch_does():
    """``fused_adamw_step`` against torch's fused AdamW given the same ``found_inf`` (as
    GradScaler hands it over): a skipped first step, an applied one, a skipped one with
    non-finite gradients, an applied one; weights, moments and step counts equal bit for bit
    after each. Ours advances the step counts of every group in one op, torch's adds and takes
    back per group."""
    torch.manual_seed(0)
    ours_m, torch_m = create_model("revcol_tiny", **NARROW), create_model("revcol_tiny", **NARROW)
    torch_m.load_state_dict(ours_m.state_dict())
    ours = make_optimizer(ours_m, "adamw", 0.05, 0.5)
    groups = param_groups(torch_m, 0.05, 0.5)
    for g in groups:
        g.pop("names")
    theirs = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8, fused=True)
    assert skips_in_kernel(ours) and type(ours) is torch.optim.AdamW and len(ours.param_groups) > 2
    for opt in (ours, theirs):
        set_lr(opt, 1e-2)
    for skip in (1.0, 0.0, 1.0, 0.0):
        for a, b in zip(ours_m.parameters(), torch_m.parameters()):
            g = torch.randn_like(a) if skip == 0.0 else torch.full_like(a, float("nan"))
            a.grad, b.grad = g.clone(), g.clone()
        with Ops() as mine:
            fused_adamw_step(ours, torch.tensor(skip))
        theirs.found_inf = torch.tensor(skip)
        with Ops() as torchs:
            theirs.step()
        for (n, a), (_, b) in zip(ours_m.named_parameters(), torch_m.named_parameters()):
            assert torch.equal(a, b), n
            sa, sb = ours.state[a], theirs.state[b]
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), n
        groups_n = len(ours.param_groups)
        assert mine.count["_fused_adamw_"] == groups_n  # our path ran: one fused kernel per group,
        assert (mine.count["_foreach_add_"], mine.count["_foreach_sub_"]) == (1, 0)  # one count update
        assert sum(torchs.count.values()) > sum(mine.count.values())  # torch's: counts added and taken back per group
    assert {float(s["step"]) for s in ours.state.values()} == {2.0}
    assert not skips_in_kernel(make_optimizer(ours_m, "sgd", 0.0))  # its skipped first step would break it
