"""Kernels and bytes of the compiled training step on a CUDA device, read from the code inductor
generates for it, on any machine: the GPU side of ``train.compile`` without a GPU.

1. One training step of the trainer's path (``LocalBackend``, bf16 autocast, inter_supv, keyed
   drop path, the default memory policy) runs on the CPU with each function ``train.compile``
   compiles (the blocks' forward and hand-written backward, the fusions, the shortcut's
   backward, the decoders) replaced by a recorder: what the engine calls, how often, with which
   shapes, strides and dtypes. It runs three times, small (batch 1 and 2 at ``--res-small``, batch
   1 at twice it), so that each dimension's dependence on batch and resolution is read off and
   the calls are carried to the target's batch and resolution exactly.
2. Each distinct call is lowered by inductor for a CUDA device (``fake_cuda.FakeCuda``: an H200,
   fake tensors, stopped before any kernel is compiled) and run eagerly on the same fake device,
   under the autocast it was called in. Its launches (Triton kernels, cuBLAS/cuDNN calls) and
   the bytes its memory-bound kernels move (inductor's count for each Triton kernel; eager: each
   op's inputs and outputs) are multiplied by the calls per step. A call made under autograd
   with an argument that requires grad (a fusion, a decoder) is compiled as ``torch.compile``
   compiles it there: a training forward, which also writes what its backward keeps, and a
   backward graph (``fake_cuda.FakeCuda.training_launches``), counted where the recording saw
   that call's backward run (the reversible forward's fusions are detached: only their
   recomputation's backward runs).

One JSON line per function and one for the step: compiled against eager kernels and GB (the
baseline: the same functions op by op, what ``train.compile: false`` runs), and the GB as
milliseconds at the device's bandwidth (``--peak-gbs``, 4,000: the H200's measured copy
bandwidth): a floor for the memory-bound part, matmuls and convolutions apart.

What it cannot see: the kernels cuBLAS/cuDNN launch inside one call, eager ops outside the compiled functions (``ops_per_step.py`` counts those),
and time itself. The recording runs LayerNorm in fp32 under autocast, as CUDA's autocast does
(the CPU's keeps bf16), so that the recorded dtypes are CUDA's.

  .venv/bin/python benchmarks/triton_codegen.py                        # RevCol-B, batch 128, 224 px
  .venv/bin/python benchmarks/triton_codegen.py --model revcol_tiny --batch 64
Needs triton beside torch (CI installs it; a CPU build of torch is enough).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_cuda  # noqa: E402
import ops_per_step as ops  # noqa: E402  (the trainer step's pieces; puts the project on sys.path)

from revcol_dist.engine.optim import make_optimizer  # noqa: E402
from revcol_dist.models import create_model  # noqa: E402
from revcol_dist.models.layers import random_streams, stream_keeps  # noqa: E402
from revcol_dist.parallel import compile as compile_setting  # noqa: E402
from revcol_dist.parallel.backends import LocalBackend  # noqa: E402
from revcol_dist.parallel.distributed import DistInfo  # noqa: E402
from revcol_dist.randomness import SampleKeys  # noqa: E402
from revcol_dist.reversible import block_kernels, coupling, fusion_kernels, lean_block  # noqa: E402
from revcol_dist.parallel import decoder_kernels, step_casts  # noqa: E402

FUNCTIONS = {"forward_full": block_kernels.forward_full, "hidden": block_kernels.hidden,
             "tail_grads": block_kernels.tail_grads, "body_grads": block_kernels.body_grads,
             "block_grads": getattr(block_kernels, "block_grads", None),
             "fusion": fusion_kernels.fusion_forward, "shortcut": coupling.shortcut_backward,
             "decoder_stage": decoder_kernels.stage_forward, "decoder_output": decoder_kernels.output_forward,
             "loss": ops.LOSS.eager_terms}
WARMUP = 2
FUNCTIONS = {name: fn for name, fn in FUNCTIONS.items() if fn is not None}  # (an older engine: fewer)
_LAYER_NORM = F.layer_norm


def _layer_norm_as_on_cuda(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``F.layer_norm`` under the CPU's autocast as CUDA's autocast runs it: in fp32 (the CPU's
    keeps the input's bf16), so that what the recording sees downstream has CUDA's dtypes."""
    if not torch.is_autocast_enabled("cpu"):
        return _LAYER_NORM(input, normalized_shape, weight, bias, eps)
    up = lambda t: t if t is None else t.float()  # noqa: E731
    with torch.autocast("cpu", enabled=False):
        return _LAYER_NORM(input.float(), normalized_shape, up(weight), up(bias), eps)


class Tensor(NamedTuple):
    """A recorded tensor argument: shape, dimension order (outermost first), dtype, whether it
    requires grad, and whether it is a weight the step cast once for the compiled calls (from
    fp32: eager mode, ``train.compile: false``, casts it inside the call)."""
    shape: Tuple[int, ...]
    order: Tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool = False
    cast: bool = False


class Call(NamedTuple):
    name: str
    args: tuple  # Tensor, None or a constant (nested tuples kept)
    autocast: Optional[torch.dtype]
    grad: bool
    backward: bool = False  # the call's backward ran in the step


_CAST_BUFFERS: List[torch.Tensor] = []  # the recorded step's weight casts (held: no address reused)


def _casting(fn):
    """``lean_block.aligned_flat``, its buffers remembered: a tensor in one is a cast weight."""
    def run(*args, **kwargs):
        flat, offsets = fn(*args, **kwargs)
        _CAST_BUFFERS.append(flat)
        return flat, offsets
    return run


def _describe(a):
    if isinstance(a, torch.Tensor):
        order = tuple(sorted(range(a.dim()), key=lambda d: (-a.stride(d), d)))
        ptr = a.untyped_storage().data_ptr()
        cast = any(b.untyped_storage().data_ptr() == ptr for b in _CAST_BUFFERS)
        return Tensor(tuple(a.shape), order, a.dtype, a.requires_grad, cast)
    if isinstance(a, (tuple, list)):
        return tuple(_describe(x) for x in a)
    return a


class GlueCount(TorchDispatchMode):
    """The step's eager launches outside the compiled functions (the autograd engine's sums and
    casts, the couplings, the heads, the optimizer's casts' gradients): on a GPU, kernels beside
    the compiled graphs'. A recorded call runs outside the mode, and while one of the autograd
    nodes it made runs (its eager backward) nothing is counted (``own``: hooks on each node,
    which fire as the node starts and ends; the engine's sum of the node's gradient into the next
    node's input, after it ends, is the step's)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = fake_cuda.Launches()
        self._seen: set = set()  # the recorded calls' nodes already hooked (``_node_key``)
        self._inside = 0  # recorded calls' backward nodes running now

    def own(self, outputs, inputs) -> None:
        """Hooks on the autograd nodes between a recorded call's outputs and its inputs: its
        backward, run in the compiled graph on the device."""
        leaves = lambda x: [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]  # noqa: E731
        before = {_node_key(t.grad_fn) for t in leaves(inputs) if t.grad_fn is not None}
        todo = [t.grad_fn for t in leaves(outputs) if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            key = None if node is None else _node_key(node)
            if key is None or type(node).__name__ == "AccumulateGrad" or key in self._seen or key in before:
                continue  # (a parameter's accumulation is the step's, as on the GPU)
            self._seen.add(key)
            node.register_prehook(self._enter)
            node.register_hook(self._leave)
            todo.extend(f for f, _ in node.next_functions)

    def _enter(self, grad_outputs):
        self._inside += 1

    def _leave(self, grad_inputs, grad_outputs):
        self._inside -= 1

    def __enter__(self):
        _GLUE.append(self)  # the recorders step out of the mode and tell it of their calls
        return super().__enter__()

    def __exit__(self, *exc):
        _GLUE.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._inside:
            launch = fake_cuda.eager_launch(func, args, kwargs, out)
            if launch is not None:
                self.out.launches.append(launch)
        return out


def _node_key(node) -> tuple:
    """An autograd node's identity: its Python object is made afresh at each access on some
    torch versions (2.11), so ``id`` does not tell; its sequence number does, with its name."""
    return node.name(), node._sequence_nr()


_GLUE: List[GlueCount] = []  # the count in effect while a step is recorded


def _recorder(name: str, fn, calls: list):
    """fn, recording each call in ``calls`` as [Call, whether its backward ran]; outside the glue
    count, which is told of the call's autograd nodes."""
    def run(*args):
        on = torch.is_autocast_enabled("cpu")
        entry = [Call(name, _describe(args), torch.get_autocast_dtype("cpu") if on else None,
                      torch.is_grad_enabled()), False]
        calls.append(entry)
        with _disable_current_modes() if _GLUE else contextlib.nullcontext():
            out = fn(*args)
        if _GLUE:
            _GLUE[-1].own(out, args)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                t.register_hook(lambda g: entry.__setitem__(1, True))  # fires when its gradient is computed
        return out
    return run


def _requires_grad(args) -> List[bool]:
    """For each Tensor among the arguments (those inside tuples too, in order), requires_grad."""
    out: List[bool] = []
    for a in args:
        if isinstance(a, Tensor):
            out.append(a.requires_grad)
        elif isinstance(a, tuple):
            out.extend(_requires_grad(a))
    return out


def record_step(model_name: str, batch: int, res: int, model_args: Optional[dict] = None,
                target: Tuple[int, int] = (0, 0), glue: Optional[GlueCount] = None) -> List[Call]:
    """The compiled functions' calls in one training step at this batch and resolution (CPU),
    with the engine's one size-dependent choice (``lean_block.keeps_output``) made as at
    ``target`` (batch, resolution) where given; the step's eager launches counted in ``glue``."""
    calls: list = []  # [Call, its backward ran]
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(F, "layer_norm", _layer_norm_as_on_cuda))
    for module in (lean_block, step_casts):
        stack.enter_context(mock.patch.object(module, "aligned_flat", _casting(lean_block.aligned_flat)))
    if target[0]:
        scale = target[0] / batch * (target[1] / res) ** 2
        decision = mock.patch.object(lean_block, "keeps_output", lambda block, o: (
            o.shape[0] * o.shape[1] * o.shape[2] * scale < block.pwconv2.weight.shape[1]))
    else:
        decision = contextlib.nullcontext()
    rec = {n: _recorder(n, f, calls) for n, f in FUNCTIONS.items()}
    kernels = lean_block.Kernels(**{f: rec[f] for f in lean_block.Kernels._fields if f in rec})
    saved = compile_setting.compiled_kernels, compile_setting.compiled_decoder
    compile_setting.compiled_kernels = lambda: kernels
    compile_setting.compiled_decoder = lambda: (rec["decoder_stage"], rec["decoder_output"])
    ops.LOSS.terms = rec["loss"]
    try:
        stack.enter_context(decision)
        torch.manual_seed(0)
        model = create_model(model_name, num_classes=ops.CLASSES, inter_supv=True, **(model_args or {})).train()
        compile_setting.apply_compile(model, True, torch.device("cpu"))
        opt = partial(make_optimizer, name="adamw", weight_decay=ops.WEIGHT_DECAY, layer_decay=ops.LAYER_DECAY)
        backend = LocalBackend(model, DistInfo(0, 1, 0), opt, torch.device("cpu"), "bf16", ops.CLIP)
        streams = random_streams(model)
        keeps = stream_keeps(model, streams)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, res, res, generator=g)
        y = torch.randint(0, ops.CLASSES, (batch,), generator=g)
        for i in range(WARMUP + 1):  # the engine's steady state: warm-up steps first, as ops_per_step counts
            if i == WARMUP:
                calls.clear()
                _CAST_BUFFERS.clear()
            with glue if glue is not None and i == WARMUP else contextlib.nullcontext():
                backend.forward_backward([(x, y, SampleKeys(0, i, torch.arange(batch), streams, keeps))], ops.LOSS)
            if i < WARMUP:
                backend.step(lr=1e-4)
        compile_setting.apply_compile(model, False, torch.device("cpu"))
    finally:
        stack.close()
        _CAST_BUFFERS.clear()
        compile_setting.compiled_kernels, compile_setting.compiled_decoder = saved
        ops.LOSS.terms = ops.LOSS.eager_terms
        lean_block.use_kernels(None)
    return [call._replace(backward=ran) for call, ran in calls]


def _exponent(small: int, big: int, factor: int) -> int:
    """k where big == small * factor**k (k in 0..2), else an error: a dimension not proportional."""
    for k in range(3):
        if big == small * factor ** k:
            return k
    raise ValueError(f"dimension {small} -> {big} is not a power of the scale {factor}")


def _carry(a, b, c, batch: float, res: float):
    """a recorded at (1, r), b at (2, r), c at (1, 2r): the same argument at (batch, res * r)."""
    if isinstance(a, Tensor):
        shape = []
        for da, db, dc in zip(a.shape, b.shape, c.shape):
            n_exp, r_exp = _exponent(da, db, 2), _exponent(da, dc, 2)
            size = da * batch ** n_exp * res ** r_exp
            if size != int(size):
                raise ValueError(f"a dimension of {da} does not scale to an integer at this batch and resolution")
            shape.append(int(size))
        return b._replace(shape=tuple(shape))  # b's dimension order: no batch of one to leave it ambiguous
    if isinstance(a, tuple) and not isinstance(a, Tensor):
        return tuple(_carry(x, y, z, batch, res) for x, y, z in zip(a, b, c))
    if isinstance(a, int) and not isinstance(a, bool) and (a != b or a != c):  # a size (interpolation target)
        return int(a * batch ** _exponent(a, b, 2) * res ** _exponent(a, c, 2))
    return a


def _nones(a) -> tuple:
    """Where an argument is None (the same in every recording, or they are not the same call)."""
    return tuple(_nones(x) if isinstance(x, tuple) and not isinstance(x, Tensor) else x is None for x in a)


class Glue(NamedTuple):
    """The step's eager launches outside the compiled functions, carried to the target size."""
    kernels: int
    gb: float
    extern_gb: float  # of these, matmuls' and convolutions'
    by_name: Counter


def _carry_gb(g1: float, g2: float, g3: float, batch: float, res: float, base: int = 1) -> float:
    """Bytes recorded at (base, r), (2 base, r), (base, 2r) at (batch, res * r), as a + b*batch
    + c*batch*res**2 (weight-sized, pooled-sized and map-sized tensors), solved from the three."""
    c = (g3 - g1) / (3 * base)
    b = (g2 - g1) / base - c
    return g1 - base * (b + c) + b * batch + c * batch * res ** 2


def step_record(model_name: str, batch: int, res: int, res_small: int,
                model_args: Optional[dict] = None) -> Tuple[Counter, Glue]:
    """Calls per step at (batch, res), each with its count, and the step's eager launches, from
    three small recordings (the deepest map at least 2x2 in each: a 1x1 map's memory layout
    cannot be told)."""
    if res_small < 64 or res % 32:
        raise ValueError(f"--res-small {res_small} and --res {res}: both multiples of 32, the recordings' at least 64")
    # the eager launches at batches 2 and 4 (at batch 1 a gradient's layout can match its
    # parameter's by accident, and the engine's copy to the parameter's layout is left out)
    glues = [GlueCount() for _ in range(3)]
    runs = [record_step(model_name, n, r, model_args, (batch, res), glue)
            for (n, r), glue in zip(((1, res_small), (2, res_small), (1, 2 * res_small)), (None, glues[0], None))]
    if len({len(r) for r in runs}) != 1 or any(len({(c.name, _nones(c.args)) for c in cs}) != 1 for cs in zip(*runs)):
        raise RuntimeError("the engine's calls differ between the recordings' sizes: the step is not carried exactly")
    out: Counter = Counter()
    for a, b, c in zip(*runs):
        out[a._replace(args=_carry(a.args, b.args, c.args, batch, res / res_small))] += 1
    for (n, r), g in zip(((4, res_small), (2, 2 * res_small)), glues[1:]):
        record_step(model_name, n, r, model_args, (batch, res), g)
    names = [Counter(k.name for k in g.out.launches) for g in glues]
    if names[0] != names[1] or names[0] != names[2]:
        raise RuntimeError("the step's eager launches differ between the recordings' sizes: not carried exactly")
    carried = lambda gbs: _carry_gb(*gbs, batch, res / res_small, base=2)  # noqa: E731
    glue = Glue(glues[0].out.kernels, carried([g.out.gb for g in glues]), carried([g.out.extern_gb for g in glues]),
                names[0])
    return out, glue


def step_calls(model_name: str, batch: int, res: int, res_small: int, model_args: Optional[dict] = None) -> Counter:
    """Calls per step at (batch, res), each with its count (``step_record``)."""
    return step_record(model_name, batch, res, res_small, model_args)[0]


def strides(a: Tensor) -> List[int]:
    """A recorded tensor's dense strides in its dimension order."""
    stride, n = [0] * len(a.shape), 1
    for d in reversed(a.order):
        stride[d], n = n, n * max(a.shape[d], 1)
    return stride


def runs_backward(call: Call) -> bool:
    """The call is a training graph (grad on, an argument requiring grad) whose backward ran."""
    return call.grad and call.backward and any(_requires_grad(call.args))


def _materialise(cuda: fake_cuda.FakeCuda, call: Call, eager: bool = False):
    """The call's arguments on the device (``eager``: cast weights in fp32, as eager mode passes them)."""
    def build(a):
        if isinstance(a, Tensor):
            return cuda.tensor(a.shape, torch.float32 if eager and a.cast else a.dtype, strides(a))
        if isinstance(a, tuple):
            return tuple(build(x) for x in a)
        return a
    return [build(a) for a in call.args]


def default_options() -> dict:
    """The options ``train.compile``'s graphs compile with by default (an older commit's
    ``INDUCTOR_OPTIONS`` where it has no ``inductor_options``)."""
    if hasattr(compile_setting, "inductor_options"):
        return compile_setting.inductor_options()
    return dict(getattr(compile_setting, "INDUCTOR_OPTIONS", {}))


def _compile_for_device(codes, row: dict, binaries: Dict[str, "fake_cuda.Binary"]) -> None:
    """``codes``: (wrapper code, launches per step) pairs: each distinct Triton kernel compiled
    once (``binaries``, by source; a failure counted once); per step, the launches of kernels that
    spill to local memory in every configuration; the most registers of a kernel's leanest one."""
    for code, k in codes:
        if k == 0:  # a backward that never ran: compiled on the device only when it first runs
            continue
        names = Counter(launch.name for launch in fake_cuda.parse_launches(code).launches if launch.triton)
        for name, source in fake_cuda.kernel_sources(code):
            if source not in binaries:
                binaries[source] = fake_cuda.compile_kernels([(name, source)])[0]
                row["cubin_failed"] += binaries[source].error is not None  # each distinct kernel once
            b = binaries[source]
            if b.spills:
                row["launches_spilling"] += k * names[name]
                row["spilling"].add(f"{name}: {min(b.local_bytes)} B local")
            row["max_registers"] = max(row["max_registers"], min(b.registers, default=0))


def generate(calls: Counter, options: Optional[dict] = None, matmul_templates: bool = False,
             cubin: bool = False) -> Dict[str, dict]:
    """Per function: calls, and compiled and eager launches and GB per step (``options``:
    inductor's, as ``train.compile`` passes them; ``matmul_templates``: see ``fake_cuda.FakeCuda``;
    ``cubin``: every generated kernel also compiled for the device, ``fake_cuda.compile_kernels``)."""
    options = default_options() if options is None else options
    def fresh_row() -> dict:
        row = dict(calls=0, backward_calls=0, compiled_kernels=0, eager_kernels=0, kernels_without_gb=0,
                   compiled_gb=0.0, eager_gb=0.0, compiled_extern_gb=0.0, eager_extern_gb=0.0, extern=Counter())
        if cubin:
            row.update(cubin_failed=0, launches_spilling=0, max_registers=0, spilling=set())
        return row

    rows: Dict[str, dict] = defaultdict(fresh_row)
    binaries: Dict[str, fake_cuda.Binary] = {}
    with fake_cuda.FakeCuda(matmul_templates=matmul_templates) as cuda:
        for call, n in calls.items():
            fn = FUNCTIONS[call.name]
            grads = _requires_grad(call.args)
            training = call.grad and any(grads)  # torch.compile makes it a forward and a backward graph
            runs = (n, n if call.backward else 0)  # the forward per call; the backward where it ran
            try:
                if training:
                    codes = cuda.training_codes(fn, _materialise(cuda, call), call.autocast, options, grads)
                    eager = cuda.eager_training_launches(fn, _materialise(cuda, call, eager=True), call.autocast, grads)
                else:
                    codes = (cuda.code(fn, _materialise(cuda, call), call.autocast, options),)
                    eager = (cuda.eager_launches(fn, _materialise(cuda, call, eager=True), call.autocast),)
                compiled = [cuda.launches(code) for code in codes]
            except Exception as e:
                raise RuntimeError(f"{call.name} on {[getattr(a, 'shape', a) for a in call.args]}: {e}") from e
            row = rows[call.name]
            if cubin:
                _compile_for_device(zip(codes, runs), row, binaries)
            row["calls"] += n
            row["backward_calls"] += runs[1] if training else 0
            for c, e, k in zip(compiled, eager, runs):
                row["compiled_kernels"] += k * c.kernels
                row["kernels_without_gb"] += k * c.uncounted
                row["eager_kernels"] += k * e.kernels
                row["compiled_gb"] += k * c.gb
                row["eager_gb"] += k * e.gb
                row["compiled_extern_gb"] += k * c.extern_gb
                row["eager_extern_gb"] += k * e.extern_gb
                for name in c.extern:
                    row["extern"][name] += k
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="revcol_base")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--res-small", type=int, default=64, help="the recordings' resolution (and twice it)")
    p.add_argument("--peak-gbs", type=float, default=4000.0)
    p.add_argument("--model-args", default="{}", help="JSON: the model's arguments changed (tests)")
    p.add_argument("--matmuls", choices=("extern", "triton"), default="extern",
                   help="triton: every matmul inductor can template as a Triton template with its neighbours "
                        "fused in (what max-autotune would generate where it times the templates faster)")
    p.add_argument("--inductor-options", default=None,
                   help="JSON: inductor's options instead of train.compile's (parallel/compile.inductor_options())")
    p.add_argument("--cubin", action="store_true",
                   help="also compile every generated kernel for the device (Triton and ptxas, sm_90; minutes): "
                        "failures, the launches of kernels that spill, the most registers")
    args = p.parse_args(argv)
    why = fake_cuda.available()
    if why:
        print(json.dumps({"bench": "triton_codegen", "skipped": why}))
        return
    options = None if args.inductor_options is None else json.loads(args.inductor_options)
    calls, glue = step_record(args.model, args.batch, args.res, args.res_small, json.loads(args.model_args))
    rows = generate(calls, options, args.matmuls == "triton", args.cubin)
    ms = lambda gb: round(gb / args.peak_gbs * 1e3, 3)  # noqa: E731
    gbs = ("compiled_gb", "eager_gb", "compiled_extern_gb", "eager_extern_gb")
    total = dict(calls=0, backward_calls=0, compiled_kernels=0, eager_kernels=0, kernels_without_gb=0,
                 **{k: 0.0 for k in gbs},
                 **(dict(cubin_failed=0, launches_spilling=0) if args.cubin else {}))
    if args.cubin:
        total["max_registers"] = max(row["max_registers"] for row in rows.values())
    for name, row in sorted(rows.items()):
        for k in total:
            if k != "max_registers":
                total[k] += row[k]
        print(json.dumps({"bench": "triton_codegen", "function": name,
                          **{k: v for k, v in row.items() if k not in ("extern", "spilling")},
                          **({"spilling": sorted(row["spilling"])} if args.cubin else {}),
                          **{k: round(row[k], 3) for k in gbs},
                          "compiled_ms_at_peak": ms(row["compiled_gb"]), "eager_ms_at_peak": ms(row["eager_gb"]),
                          "compiled_all_ms_at_peak": ms(row["compiled_gb"] + row["compiled_extern_gb"]),
                          "eager_all_ms_at_peak": ms(row["eager_gb"] + row["eager_extern_gb"]),
                          "extern_per_step": dict(row["extern"])}))
    print(json.dumps({"bench": "triton_codegen", "function": "eager_glue", "kernels": glue.kernels,
                      "gb": round(glue.gb, 3), "extern_gb": round(glue.extern_gb, 3),
                      "ms_at_peak": ms(glue.gb), "top": glue.by_name.most_common(10)}))
    print(json.dumps({"bench": "triton_codegen", "model": args.model, "batch": args.batch, "res": args.res,
                      "device": fake_cuda.H200.name, "torch": torch.__version__,
                      "inductor_options": default_options() if options is None else options,
                      "matmuls": args.matmuls, **total, **{k: round(total[k], 3) for k in gbs},
                      "kernels_compiled_over_eager": round(total["compiled_kernels"] / total["eager_kernels"], 3),
                      "gb_compiled_over_eager": round(total["compiled_gb"] / total["eager_gb"], 3),
                      "compiled_ms_at_peak": ms(total["compiled_gb"]), "eager_ms_at_peak": ms(total["eager_gb"]),
                      "compiled_all_ms_at_peak": ms(total["compiled_gb"] + total["compiled_extern_gb"]),
                      "eager_all_ms_at_peak": ms(total["eager_gb"] + total["eager_extern_gb"]),
                      "eager_glue_kernels": glue.kernels, "eager_glue_gb": round(glue.gb, 3),
                      "step_kernels": total["compiled_kernels"] + glue.kernels,
                      "step_gb": round(total["compiled_gb"] + glue.gb, 3),
                      "step_all_ms_at_peak": ms(total["compiled_gb"] + total["compiled_extern_gb"] + glue.gb + glue.extern_gb),
                      "peak_gbs": args.peak_gbs}))


if __name__ == "__main__":
    main()
