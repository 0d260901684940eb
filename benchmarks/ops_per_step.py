"""Kernels per training step, counted on any machine: the CPU-side proxy for a GPU's launch
count (docs/benchmarks.md holds it against the H200 profile).

One step through the trainer's own path (``LocalBackend``, bf16 autocast, ``RevColLoss`` with
inter_supv, keyed drop path, AdamW over the recipe's layer-decay groups, gradient clipping and
the finite check, the EMA update), after warm-up steps; and the same step by plain autograd,
whose ratio to the reversible one a GPU profile also gives. Drop path's draws are declared to
``SampleKeys`` as the Trainer does (drawn at once); the baselines draw them module by module. Every op that reaches the dispatcher
below autograd is counted, by phase (forward + backward, optimizer step, EMA); views and
detaches launch nothing and are counted apart, as are host reads (``_local_scalar_dense``:
a host sync on a GPU). The optimizer is this project's (``make_optimizer``: fused) against
the baseline a user gets from torch with the same groups: ``foreach`` (torch's default on a
GPU) and the per-parameter loop (its default on a CPU).

  .venv/bin/python benchmarks/ops_per_step.py                       # RevCol-B, batch 2, 64 px
  BENCH_MODEL=revcol_tiny .venv/bin/python benchmarks/ops_per_step.py

With ``train.compile`` (the ``*_compiled`` rows) the compiled graphs cannot run under the
counting dispatch mode: each compiled call steps out of it, and a profiler over the phase
counts what the graphs ran, one per generated kernel and per aten op a graph called outside
the mode (``graph_kernels``).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from revcol_dist.engine.ema import ModelEMA  # noqa: E402
from revcol_dist.engine.losses import RevColLoss  # noqa: E402
from revcol_dist.engine.optim import make_optimizer, param_groups  # noqa: E402
from revcol_dist.models import create_model  # noqa: E402
from revcol_dist.models.layers import random_streams, stream_keeps  # noqa: E402
from revcol_dist.parallel.backends import LocalBackend  # noqa: E402
from revcol_dist.parallel import compile as compile_setting  # noqa: E402
from revcol_dist.parallel.compile import apply_compile, compile_loss  # noqa: E402
from revcol_dist.parallel.distributed import DistInfo  # noqa: E402
from revcol_dist.randomness import SampleKeys  # noqa: E402
from revcol_dist.reversible import lean_block  # noqa: E402

torch._inductor.config.cpp.enable_kernel_profile = True  # generated kernels appear in the profiler

MODEL = os.environ.get("BENCH_MODEL", "revcol_base")
BATCH = int(os.environ.get("BENCH_BATCH", "2"))
RES = int(os.environ.get("BENCH_RES", "64"))
CLASSES = 1000
WEIGHT_DECAY, LAYER_DECAY, CLIP = 0.05, 0.9, 5.0  # the recipe's groups (layer decay as in fine-tuning)
LOSS = RevColLoss((0.5,) * 3, (0.25,) * 3)


def _flat(out):
    return out if isinstance(out, (tuple, list)) else (out,)


class OpCounter(TorchDispatchMode):
    """Ops by name, and how many launch work: not views or other metadata-only ops, not host
    reads (a host sync where the tensor is on a GPU; torch's non-fused optimizers read their
    step counts, which a GPU run keeps on the host)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter = Counter()
        self.kernels = self.views = self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.by_name[name] += 1
        out = func(*args, **(kwargs or {}))
        if name == "aten._local_scalar_dense":
            self.host_reads += 1
        elif func.is_view or not (func._schema.is_mutable or any(isinstance(t, torch.Tensor) for t in _flat(out))):
            self.views += 1  # metadata only (views, promote_types, sizes)
        else:
            self.kernels += 1
        return out

    def __enter__(self):
        _COUNTING.append(self)
        self._profile = None
        if lean_block.kernels_in_use():  # compiled graphs run in this phase: count their kernels too
            self._profile = profile(activities=[ProfilerActivity.CPU])
            self._profile.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        _COUNTING.pop()
        if self._profile is not None:
            self._profile.__exit__(*exc)
            n = graph_kernels(self._profile)
            self.kernels += n
            self.by_name["compiled graphs' kernels"] += n
        return out

    def summary(self) -> dict:
        return {"kernels": self.kernels, "views": self.views, "host_reads": self.host_reads}


_COUNTING: list = []  # the OpCounters in effect, innermost last
_OUTSIDE = "compiled call, outside the counting mode"
# what a compiled graph calls that launches nothing (allocation, views)
_METADATA = {"aten::empty", "aten::empty_strided", "aten::as_strided", "aten::view", "aten::reshape", "aten::permute",
             "aten::t", "aten::transpose", "aten::expand", "aten::alias", "aten::detach", "aten::resolve_conj",
             "aten::resolve_neg", "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select"}


def _inside(event, name: str) -> bool:
    while event is not None:
        if event.name == name:
            return True
        event = event.cpu_parent
    return False


def graph_kernels(prof) -> int:
    """Kernels run by compiled graphs in a profile that the dispatch mode did not see: each
    generated kernel (one GPU kernel each there), and each aten op (a matmul, a convolution) of
    a graph called outside the mode (``counted``). A graph's backward runs under the mode,
    which counts its aten ops itself."""
    n = 0
    for e in prof.events():
        if not e.name.startswith("## Call CompiledFxGraph"):
            continue
        outside = _inside(e, _OUTSIDE)
        for c in e.cpu_children:
            if c.name in _METADATA:
                continue
            if not c.name.startswith("aten::") or outside:
                n += 1
    return n


def _outside_mode(fn):
    """``fn`` callable while an OpCounter counts: dynamo refuses to run under a dispatch mode
    (the graphs would fall back to eager), so each call steps out of the mode, and the
    OpCounter's profile counts what it ran (``graph_kernels``)."""
    def run(*args):
        if not _COUNTING:
            return fn(*args)
        with _disable_current_modes(), record_function(_OUTSIDE):
            return fn(*args)
    return run


def counted(kernels: lean_block.Kernels) -> lean_block.Kernels:
    """The compiled kernels (``train.compile``), callable while an OpCounter counts."""
    return lean_block.Kernels(*(_outside_mode(f) if callable(f) else f for f in kernels))


def count_compiled() -> None:
    """Every compiled function ``train.compile`` set (blocks, fusions, decoders, loss) callable while
    an OpCounter counts (after ``apply_compile``)."""
    lean_block.use_kernels(counted(lean_block.use_kernels(None)))
    key = compile_setting._CHOICE
    compile_setting._DECODER[key] = tuple(_outside_mode(f) for f in compile_setting.compiled_decoder(*key))
    LOSS.terms = _outside_mode(LOSS.terms)


def baseline_adamw(model: torch.nn.Module, foreach: bool) -> torch.optim.Optimizer:
    """torch's AdamW over the same layer-decay groups, as a user would build it."""
    groups = param_groups(model, WEIGHT_DECAY, LAYER_DECAY)
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8, foreach=foreach)


def count_step(optimizer_factory, reversible: bool = True, declare_streams: bool = True,
               compiled: bool = False) -> dict:
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=CLASSES, inter_supv=True).train()
    model.reversible = reversible
    apply_compile(model, compiled, torch.device("cpu"))
    compile_loss(LOSS, compiled, torch.device("cpu"))
    if compiled:
        count_compiled()
    backend = LocalBackend(model, DistInfo(0, 1, 0), optimizer_factory, torch.device("cpu"), "bf16", CLIP)
    ema = ModelEMA(model, 0.9999)
    streams = random_streams(model) if declare_streams else ()  # the Trainer declares them: drawn at once
    keeps = stream_keeps(model, streams)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, 3, RES, RES, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)

    def step(i: int, counters=None):
        phases = {}
        for phase, run in (("forward_backward", lambda: backend.forward_backward(
                               [(x, y, SampleKeys(0, i, torch.arange(BATCH), streams, keeps))], LOSS)),
                           ("optimizer", lambda: backend.step(lr=1e-4)),
                           ("ema", ema.update)):
            if counters is None:
                run()
                continue
            with OpCounter() as c:
                run()
            phases[phase] = c
        return phases

    for i in range(2):  # optimizer state made, caches warm
        step(i)
    phases = step(2, counters=True)
    total = sum((c.by_name for c in phases.values()), Counter())
    out = {p: c.summary() for p, c in phases.items()}
    out["step"] = {k: sum(c.summary()[k] for c in phases.values()) for k in ("kernels", "views", "host_reads")}
    out["top"] = total.most_common(int(os.environ.get("BENCH_TOP", "8")))
    out["param_groups"] = len(backend.optimizer.param_groups)
    out["params"] = sum(1 for _ in model.parameters())
    apply_compile(model, False, torch.device("cpu"))
    compile_loss(LOSS, False, torch.device("cpu"))
    return out


def main() -> None:
    ours = count_step(partial(make_optimizer, name="adamw", weight_decay=WEIGHT_DECAY, layer_decay=LAYER_DECAY))
    # the baselines: torch's AdamW over the same groups, drop path drawn module by module
    foreach = count_step(partial(baseline_adamw, foreach=True), declare_streams=False)
    loop = count_step(partial(baseline_adamw, foreach=False), declare_streams=False)
    plain = count_step(partial(baseline_adamw, foreach=True), reversible=False, declare_streams=False)
    ours_opt = partial(make_optimizer, name="adamw", weight_decay=WEIGHT_DECAY, layer_decay=LAYER_DECAY)
    compiled = count_step(ours_opt, compiled=True)  # train.compile: the blocks as compiled graphs
    compiled_plain = count_step(ours_opt, reversible=False, compiled=True)
    ours_plain = count_step(ours_opt, reversible=False)
    k = lambda r, p: r[p]["kernels"]  # noqa: E731
    print(json.dumps({
        "benchmark": "ops_per_step", "model": MODEL, "batch": BATCH, "res": RES, "precision": "bf16",
        "ours": ours, "ours_compiled": compiled, "ours_plain": ours_plain, "ours_plain_compiled": compiled_plain,
        "torch_adamw_foreach": foreach, "torch_adamw_loop": loop, "plain_torch_adamw_foreach": plain,
        "reversible_vs_plain_kernels": round(k(foreach, "step") / k(plain, "step"), 4),
        "forward_backward_kernels_vs_foreach": round(k(ours, "forward_backward") / k(foreach, "forward_backward"), 4),
        "optimizer_kernels_vs_foreach": round(k(ours, "optimizer") / k(foreach, "optimizer"), 4),
        "optimizer_kernels_vs_loop": round(k(ours, "optimizer") / k(loop, "optimizer"), 4),
        "step_kernels_vs_foreach": round(k(ours, "step") / k(foreach, "step"), 4),
        "step_kernels_vs_loop": round(k(ours, "step") / k(loop, "step"), 4),
        "optimizer_host_reads": ours["optimizer"]["host_reads"],
        "compiled_vs_eager_step_kernels": round(k(compiled, "step") / k(ours, "step"), 4),
        "compiled_vs_eager_forward_backward_kernels": round(k(compiled, "forward_backward") / k(ours, "forward_backward"), 4),
        "plain_compiled_vs_eager_step_kernels": round(k(compiled_plain, "step") / k(ours_plain, "step"), 4),
    }))


if __name__ == "__main__":
    main()
