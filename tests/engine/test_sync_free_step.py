"""A training step never makes the host wait for its own work.

On a GPU a host read of a tensor (``float``, ``bool``, ``.item()``) waits for every kernel
queued before it. The Trainer reads a step's loss and skip decision one step late
(``Trainer.settle``, after the next step's forward and backward are queued), and the fused
AdamW decides a skip in its kernel; so the only reads inside a step are of tensors an earlier
step made. Checked on the CPU by tagging every tensor the step's ops produce and failing on a
host read of one of them."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from revcol_dist.config import load_config
from revcol_dist.engine.train import Trainer


# ops whose result the host must wait for: a value (``float``, ``bool``, ``.item()``) or an
# output shape that depends on the data
WAITS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}


def _waited_on(name, args):
    """The tensors whose values the host waits for in this op: the argument of ``WAITS``, the
    boolean masks of an indexing (its shape is their count of True)."""
    if name in WAITS:
        return [args[0]]
    if name in ("index", "index_put", "index_put_"):
        return [i for i in args[1] if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
    return []


class HostReads(TorchDispatchMode):
    """Host reads (``WAITS``), split by whether the tensor read was made (or written in place)
    under this mode; ``first_read`` and ``first_backward``: where the first read of an earlier
    step's tensor and the first convolution backward came in the op sequence."""

    def __init__(self):
        super().__init__()
        self.made = {}  # id -> weak reference (tensors compare elementwise: no WeakSet)
        self.of_this_step, self.of_earlier_steps = 0, 0
        self.ops, self.first_read, self.first_backward = 0, None, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.overloadpacket.__name__
        if name == "convolution_backward" and self.first_backward is None:
            self.first_backward = self.ops
        for read in _waited_on(name, args):
            ref = self.made.get(id(read))
            if ref is not None and ref() is read:
                self.of_this_step += 1
            else:
                self.of_earlier_steps += 1
                self.first_read = self.ops if self.first_read is None else self.first_read
        out = func(*args, **(kwargs or {}))
        written = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)] if func._schema.is_mutable \
            else []
        for t in tree_leaves(out) + written:
            if isinstance(t, torch.Tensor):
                self.made[id(t)] = weakref.ref(t)
        return out


def _steps(trainer, batches, n, check=True):
    counts, settled_at = [], []
    settle = trainer.settle

    def noted():  # where in the step's op sequence the step before is settled
        settled_at.append((reads.ops, trainer.unsettled.step if trainer.unsettled else None))
        settle()
    trainer.settle = noted
    try:
        for _ in range(n):
            settled_at.clear()
            before = trainer.step
            with HostReads() as reads:
                trainer.train_step(*next(batches))
            counts.append((reads.of_this_step, reads.of_earlier_steps))
            # the step before is settled once this step's backward is queued (on a GPU the
            # device is busy with it meanwhile)
            if check:
                assert [s for _, s in settled_at] == [before], settled_at
                assert settled_at[0][0] > reads.first_backward > 0
    finally:
        trainer.settle = settle
    return counts


def test_a_step_reads_only_what_earlier_steps_made(tmp_path):
    """The recipe's pieces on: bf16, clipping, EMA, mixup and cutmix."""
    overrides = [f"output_dir={tmp_path}", f"data.root={tmp_path}/digits", "train.max_steps=50",
                 "train.log_every=1000", "monitor.images_every=0", "monitor.console=none", "train.precision=bf16",
                 "train.clip_grad=1.0", "train.ema_decay=0.99", "data.mixup=0.8", "data.cutmix=1.0"]
    trainer = Trainer(load_config(None, overrides), log=lambda *_: None)
    assert trainer.backend.optimizer.defaults.get("fused") and trainer.ema is not None and trainer.mixer is not None
    batches = iter(trainer.train_stream)
    _steps(trainer, batches, 2, check=False)  # the first step logs (it settles at once, by design)
    counts = _steps(trainer, batches, 3)
    # no host read of this step's tensors; the step before's values come from the host copy
    # its own step made (engine/step_values.py: no tensor read at all)
    assert counts == [(0, 0)] * 3, counts
    assert trainer.unsettled is not None and trainer.unsettled.step == trainer.step
    trainer.settle()
    assert trainer.unsettled is None and 0.0 < trainer.last_loss < 10.0 and set(trainer.last_parts) >= {"loss_cls_final"}


def test_the_mode_sees_a_read_of_this_steps_tensor():
    """The check's own criterion: a read of a tensor made under the mode is counted as such."""
    x, earlier = torch.ones(3), torch.ones(())
    with HostReads() as reads:
        y = x.sum()
        bool(torch.isfinite(y))
        float(earlier)
        x[x > 0]  # a shape from the data (nonzero)
    assert (reads.of_this_step, reads.of_earlier_steps) == (2, 1)
