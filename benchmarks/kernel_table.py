"""Per-kernel table of one RevCol training step: where the GPU time goes, and how far each op is
from its roofline (the H200's first profile: shared/gpu/MEASURED.md).

The trainer's step as benchmarks/ops_per_step.py builds it (LocalBackend, bf16 autocast, RevColLoss
with inter_supv, keyed drop path, AdamW over the layer-decay groups, clipping, EMA) runs under
torch.profiler (record_shapes, with_flops). Each aten op doing its own work (on a GPU: launching
kernels; on a CPU: handing none on to a child op) is charged, for its self time, the bytes of its
tensor inputs and outputs and the FLOPs of matmuls and convolutions; grouped by op, input shapes
and dtypes, that gives GB/s or TFLOP/s and %peak (the larger share of the device's peak; "bound"
says which). The step's own roofline, "ideal" = sum over ops of max(FLOPs / peak FLOP/s, bytes /
peak GB/s), is its baseline. Without a GPU the CPU self time (one thread) stands in, "timing":
"cpu": a smoke test of the accounting, not a measurement.
Outputs are estimated (the profiler records inputs only): in place, the first argument is written
(copy_ and fills: not read); matmul, M x N; convolution, from its FLOPs; reductions, nothing;
otherwise the inputs' broadcast. A TensorList's tensors count as fp32.

  .venv/bin/python benchmarks/kernel_table.py                # CPU: RevCol-B, batch 2, 64 px
  BENCH_MODEL=revcol_tiny .venv/bin/python benchmarks/kernel_table.py
  python3 benchmarks/kernel_table.py                         # GPU machine: batch 128, 224 px
Also BENCH_BATCH, BENCH_RES, BENCH_ROWS (30), BENCH_PEAK_GBS (4000: the H200's copy bandwidth),
BENCH_PEAK_TFLOPS (790: its bf16 matmul), BENCH_MODEL_ARGS (JSON: the model's arguments changed,
e.g. '{"num_columns": 2}' for the test's smoke run). Table on stderr, one JSON line on stdout.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ops_per_step as ops  # noqa: E402  (the step's pieces; puts the project on sys.path)

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
MODEL = os.environ.get("BENCH_MODEL", "revcol_base")
MODEL_ARGS = json.loads(os.environ.get("BENCH_MODEL_ARGS", "{}"))
BATCH = int(os.environ.get("BENCH_BATCH", "128" if CUDA else "2"))
RES = int(os.environ.get("BENCH_RES", "224" if CUDA else "64"))
ROWS = int(os.environ.get("BENCH_ROWS", "30"))
PEAK_GBS = float(os.environ.get("BENCH_PEAK_GBS", "4000"))
PEAK_TFLOPS = float(os.environ.get("BENCH_PEAK_TFLOPS", "790"))

DTYPES = {"float": (4, "f32"), "double": (8, "f64"), "c10::BFloat16": (2, "bf16"), "c10::Half": (2, "f16"),
          "long int": (8, "i64"), "int": (4, "i32"), "short int": (2, "i16"), "bool": (1, "b8"),
          "unsigned char": (1, "u8"), "signed char": (1, "i8")}
NOT_TENSOR = {"", "Scalar", "ScalarList", "GenericList", "String", "None"}
META = {"empty", "empty_strided", "empty_like", "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided",
        "as_strided_", "resize_", "t", "transpose", "permute", "expand", "expand_as", "unsqueeze", "squeeze", "select",
        "slice", "detach", "detach_", "alias", "set_", "lift_fresh", "unbind", "split", "split_with_sizes", "chunk",
        "narrow", "view_as", "resolve_conj", "resolve_neg", "_local_scalar_dense", "item", "is_nonzero",
        "result_type", "promote_types", "_has_compatible_shallow_copy_type", "is_same_size", "record_stream"}
NEVER = META | {"to", "_to_copy", "clone", "contiguous", "flatten", "type_as", "lift_fresh_copy"}  # wrappers
PREP = {"to", "_to_copy", "clone", "contiguous", "copy_", "fill_", "zero_", "scalar_tensor", "zeros", "zeros_like",
        "ones_like", "full", "full_like"}  # a cast, a layout copy or an init that an op does first
WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_"}
REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "norm", "linalg_vector_norm", "var_mean", "std", "var", "all",
          "any", "argmax", "argmin", "_foreach_norm", "nll_loss_forward", "prod", "count_nonzero"}
MATMUL = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_scaled_mm", "addmv", "mv", "dot"}


def is_matmul(op: str) -> bool:
    return op in MATMUL or "conv" in op


def tensor_args(e) -> list:
    """Per argument, its tensors as (shape, bytes per element). torch < 2.12 records no shapes of
    a TensorList's tensors in events(): the foreach and fused optimizer ops then move nothing known."""
    shapes = getattr(e, "structured_input_shapes", None) or e.input_shapes or []
    out = []
    for s, d in zip(shapes, e.input_dtypes):
        if d == "TensorList":
            out.append([(tuple(x), 4) for x in s if isinstance(x, (list, tuple))])
        else:
            out.append([] if d in NOT_TENSOR else [(tuple(s), DTYPES.get(d, (4,))[0])])
    return out


def bytes_moved(op: str, args: list, flops: int) -> int:
    """Inputs read plus outputs written (estimated: the profiler records inputs only)."""
    reads = [sum(math.prod(s) * b for s, b in a) for a in args]
    ts = [t for a in args for t in a]
    if op.endswith("_") and not op.endswith("__") and ts:  # in place (fused Adam: params and both moments)
        written = [0, 2, 3] if op.startswith("_fused_adam") else [0]
        return sum(reads) + sum(reads[i] for i in written if i < len(reads)) - (reads[0] if op in WRITE_ONLY else 0)
    if op in REDUCE or not ts:
        return sum(reads)
    if op in MATMUL and len(ts) >= 2:
        (a, size), (b, _) = ts[-2], ts[-1]
        return sum(reads) + math.prod(a[:-1]) * b[-1] * size
    if "conv" in op and len(ts) >= 3 and "backward" in op:  # grad input and grad weight
        return sum(reads) + sum(math.prod(s) * b for s, b in ts[1:3])
    if "conv" in op and len(ts) >= 2 and flops:  # output elements = FLOPs / (2 x MACs per output)
        return sum(reads) + flops // (2 * max(1, math.prod(ts[1][0][1:]))) * ts[0][1]
    if op in ("cat", "stack") or op.startswith("_foreach"):
        return sum(reads) + (sum(reads) if op in ("cat", "stack") else reads[0])
    try:
        out = math.prod(torch.broadcast_shapes(*(s for s, _ in ts)))
    except RuntimeError:
        out = max(math.prod(s) for s, _ in ts)
    return sum(reads) + out * max(b for _, b in ts)


def op_flops(e, op: str, args: list) -> int:
    """Matmuls' and convolutions' FLOPs only (with_flops counts elementwise add/mul too)."""
    if not is_matmul(op):
        return 0
    ts = [t for a in args for t in a]
    if "conv" in op and "backward" in op and len(ts) >= 3:  # grad input + grad weight: twice the forward's
        return 4 * math.prod(ts[0][0]) * math.prod(ts[2][0][1:])
    while e is not None and not e.flops:  # conv2d carries the FLOPs, a child of it launches the kernel
        e = e.cpu_parent
    return int(e.flops) if e is not None else 0


def build_step():
    torch.manual_seed(0)
    model = ops.create_model(MODEL, num_classes=ops.CLASSES, inter_supv=True, **MODEL_ARGS).train()
    opt = partial(ops.make_optimizer, name="adamw", weight_decay=ops.WEIGHT_DECAY, layer_decay=ops.LAYER_DECAY)
    backend = ops.LocalBackend(model, ops.DistInfo(0, 1, 0), opt, DEV, "bf16", ops.CLIP)
    ema, streams, i = ops.ModelEMA(model, 0.9999), ops.random_streams(model), [0]
    keeps = ops.stream_keeps(model, streams)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, 3, RES, RES, generator=g), torch.randint(0, ops.CLASSES, (BATCH,), generator=g)
    x, y, ids = x.to(DEV), y.to(DEV), torch.arange(BATCH, device=DEV)

    def step():
        backend.forward_backward([(x, y, ops.SampleKeys(0, i[0], ids, streams, keeps))], ops.LOSS)
        backend.step(lr=1e-4)
        ema.update()
        i[0] += 1
        if CUDA:
            torch.cuda.synchronize()
    return step


def sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


def main() -> None:
    if CUDA:
        torch.backends.cudnn.benchmark = True  # the trainer's default
    else:
        torch.set_num_threads(1)  # a smoke test: steadier on a shared machine
    step = build_step()
    n_warm, n_time, n_prof = (2, 5, 3) if CUDA else (1, 1, 1)
    for _ in range(n_warm):  # optimizer state made, cudnn's algorithms chosen
        step()
    t0 = time.perf_counter()
    for _ in range(n_time):
        step()
    step_ms = (time.perf_counter() - t0) / n_time * 1000
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * CUDA, record_shapes=True,
                 with_flops=True) as p:
        for _ in range(n_prof):
            step()
    events = p.events()
    if not hasattr(events[0], "input_dtypes"):  # torch < 2.12: dtypes from the kineto events
        dtypes = {k.correlation_id(): k.dtypes() for k in p.profiler.kineto_results.events()}
        for e in events:
            e.input_dtypes = dtypes.get(e.id, [])
    self_us = (lambda e: e.self_device_time_total) if CUDA else (lambda e: e.self_cpu_time_total)
    aten = [e for e in events if e.device_type.name == "CPU" and e.name.startswith("aten::")]

    def does_work(e) -> bool:
        if CUDA:
            return e.self_device_time_total > 0
        # a CPU op hands its work on (linear -> addmm, a foreach op's per-tensor fallback) when
        # a child is neither metadata nor a preparation (addmm's bias copy: an op of its own)
        return e.name[6:] not in NEVER and all(c.name[6:] in META | PREP for c in e.cpu_children
                                               if c.name.startswith("aten::"))

    groups = defaultdict(lambda: [0, 0.0, 0, 0])  # calls, µs, bytes, FLOPs
    unsized, worker_calls = defaultdict(float), 0
    for e in filter(does_work, aten):
        op, args = e.name[6:], tensor_args(e)
        fl = op_flops(e, op, args)
        b = bytes_moved(op, args, fl)
        worker_calls += 1
        if b <= 0:  # nothing known to move (scalar_tensor, arange; TensorLists before torch 2.12): apart
            unsized[op] += self_us(e) / n_prof / 1000
            continue
        dt = ",".join(DTYPES.get(d, (4, d))[1] for d in e.input_dtypes if d not in NOT_TENSOR)
        shapes = ", ".join(f"({'x'.join(map(str, a[0][0]))})" if len(a) == 1 else f"[{len(a)} tensors]"
                           for a in args if a)
        for k, v in enumerate((1, self_us(e), b, fl)):
            groups[op, shapes, dt][k] += v
    if CUDA:
        device_events = [e for e in events if e.device_type.name == "CUDA"]
        busy_us, kernels = sum(e.self_device_time_total for e in device_events), len(device_events) / n_prof
    else:
        busy_us, kernels = sum(e.self_cpu_time_total for e in aten), None
    rows = []
    for (op, shapes, dt), (calls, us, b, fl) in groups.items():
        ms, gb, tf = us / n_prof / 1000, b / n_prof / 1e9, fl / n_prof / 1e12
        ideal, per_s = max(gb / PEAK_GBS, tf / PEAK_TFLOPS) * 1000, 1000 / ms if ms > 0 else None
        rows.append({"op": op, "shapes": shapes[:120], "dtypes": dt[:60], "matmul": is_matmul(op),
                     "calls": calls / n_prof, "ms": round(ms, 6), "bytes": round(b / n_prof),
                     "flops": round(fl / n_prof), "gbs": per_s and sig(gb * per_s), "tflops": per_s and sig(tf * per_s),
                     "bound": "flops" if tf / PEAK_TFLOPS > gb / PEAK_GBS else "bytes", "ideal_ms": ideal,
                     "pct_peak": per_s and sig(100 * ideal / ms, 4)})
    rows.sort(key=lambda r: -r["ms"])
    busy_ms, ideal_ms, unsized_ms = busy_us / n_prof / 1000, sum(r["ideal_ms"] for r in rows), sum(unsized.values())
    share = {k: round(sum(r["ms"] for r in rows if f(r)) / busy_ms, 4) for k, f in
             (("matmul_share", lambda r: r["matmul"]), ("memory_bound_share", lambda r: r["bound"] == "bytes"))}
    timing = "cuda" if CUDA else "cpu"
    log = partial(print, file=sys.stderr)
    log(f"{MODEL}, batch {BATCH}, {RES} px, bf16, {timing} timing: step {step_ms:.1f} ms wall, {busy_ms:.1f} ms busy, "
        f"{worker_calls / n_prof:.0f} ops" + (f", {kernels:.0f} kernels" if kernels else "") + " per step")
    log(f"{'ms':>8} {'%':>5} {'calls':>6} {'GB':>7} {'GB/s':>8} {'TFLOP/s':>8} {'%peak':>6} bound  op  inputs")
    for r in rows[:ROWS]:
        log(f"{r['ms']:8.2f} {100 * r['ms'] / busy_ms:5.1f} {r['calls']:6.0f} {r['bytes'] / 1e9:7.3f} "
            f"{r['gbs'] or 0:8.1f} {r['tflops'] or 0:8.2f} {r['pct_peak'] or 0:6.1f} {r['bound']:5}  {r['op']}  "
            f"{r['shapes'][:60]} {r['dtypes'][:24]}")
    log(f"ideal (roofline at {PEAK_GBS:.0f} GB/s, {PEAK_TFLOPS:.0f} TFLOP/s): {ideal_ms:.2f} ms, "
        f"{ideal_ms / busy_ms:.1%} of busy; matmuls and convolutions {share['matmul_share']:.1%} of busy, "
        f"memory-bound ops {share['memory_bound_share']:.1%}; {unsized_ms:.2f} ms in ops of no known size")
    print(json.dumps({
        "benchmark": "kernel_table", "device": torch.cuda.get_device_name() if CUDA else "cpu", "timing": timing,
        "torch": torch.__version__, "model": MODEL, "model_args": MODEL_ARGS, "batch": BATCH, "res": RES,
        "precision": "bf16", "step_ms": round(step_ms, 3), "busy_ms": round(busy_ms, 3),
        "ops_per_step": worker_calls / n_prof,
        "kernels_per_step": kernels, **share, "unsized_ms": round(unsized_ms, 3),
        "unsized": {k: round(v, 3) for k, v in sorted(unsized.items(), key=lambda kv: -kv[1])[:10]},
        "ideal_ms": round(ideal_ms, 4), "ideal_vs_busy": round(ideal_ms / busy_ms, 5), "peak_gbs": PEAK_GBS,
        "peak_tflops": PEAK_TFLOPS, "rows": [{**r, "ideal_ms": sig(r["ideal_ms"])} for r in rows[:ROWS]],
    }))


if __name__ == "__main__":
    main()
