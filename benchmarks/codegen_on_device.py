"""The compiled step's functions generated and timed on a real CUDA device: what
``triton_codegen.py`` reads off a fake one, checked where a GPU is at hand.

The same calls as ``triton_codegen.py`` (one recorded training step of the trainer's path,
carried to the target's batch and resolution), each compiled here by ``torch.compile`` itself
(``train.compile``'s options; the real AOTAutograd, partitioner and inductor for this device),
its generated code captured (``run_and_get_code``) and its launches counted as
``triton_codegen.py`` counts them; then timed (ten runs between two synchronisations, after two
warm-up runs). One JSON
line per function with its kernels and Triton GB per step (compare them with
``triton_codegen.py``'s rows of the same commit: the fake device's) and its milliseconds per
step (matmuls included; with ``triton_codegen.py``'s bytes, matmuls' included, the function's
achieved bandwidth), and one for the step.

  python3 benchmarks/codegen_on_device.py --functions forward_full,block_grads   # ~2 min on an H100
  python3 benchmarks/codegen_on_device.py --autotune                            # train.compile_autotune's search
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_cuda  # noqa: E402
import triton_codegen as tc  # noqa: E402

from revcol_dist.parallel import compile as compile_setting  # noqa: E402


def real_arguments(call: tc.Call, device: torch.device) -> list:
    """The call's arguments as tensors on the device: its shapes, layouts, dtypes and
    requires_grad flags; normal values (what a kernel's choice and time do not depend on)."""
    def build(a):
        if isinstance(a, tc.Tensor):
            t = torch.empty_strided(a.shape, tc.strides(a), dtype=a.dtype, device=device)
            t = t.normal_() if t.is_floating_point() else t.zero_()
            return t.requires_grad_(a.requires_grad and t.is_floating_point())
        if isinstance(a, tuple):
            return tuple(build(x) for x in a)
        return a
    return [build(a) for a in call.args]


def _timed(run, device: torch.device, reps: int) -> float:
    """Milliseconds per run. On CUDA: device time between events around each run, L2 flushed
    before each (a level-3 map fits the H200's 60 MB L2 and would be read from it), the gaps a
    slow host leaves included; elsewhere wall time."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        return (time.perf_counter() - t0) / reps * 1e3
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return sum(start.elapsed_time(end) for start, end in events) / reps


def measure_call(call: tc.Call, options: dict, device: torch.device, reps: int = 10):
    """(launches of each code torch.compile generated for the call: its forward, and its
    backward where the call's backward ran; milliseconds per call). A call whose graph this
    process compiled before generates nothing new: ``main`` resets dynamo before each."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    # kernel_num_gb in each kernel's source, as on the fake device (a harness per kernel, the
    # same kernels); no cache: a cached graph would bring its backward's code along unasked
    fn = torch.compile(tc.FUNCTIONS[call.name], dynamic=False, fullgraph=True,
                       options={**options, "benchmark_kernel": True})
    args = real_arguments(call, device)
    backward = tc.runs_backward(call)

    def run():
        with torch.autocast(device.type, dtype=call.autocast or torch.bfloat16, enabled=call.autocast is not None), \
                torch.set_grad_enabled(call.grad):
            out = fn(*args)
        if backward:
            outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            wanted = [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.requires_grad]
            torch.autograd.grad(outs, wanted, [torch.ones_like(o) for o in outs], allow_unused=True)

    with inductor_config.patch(force_disable_caches=True):
        _, codes = run_and_get_code(run)
    if len(codes) > (2 if backward else 1):
        raise RuntimeError(f"{call.name}: {len(codes)} graphs generated for one call (a forward"
                           f"{' and its backward' if backward else ''} expected)")
    launches = [fake_cuda.parse_launches(code) for code in codes]
    for _ in range(2):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return launches, _timed(run, device, reps)


def add_up(calls, measure, only: set, budget_s: float, say) -> dict:
    """Per function: calls (and those whose backward ran), launches, Triton GB and milliseconds
    per step, each distinct call measured once and weighted by its count; ``say`` gets a line
    per call as it is measured. Stops at the budget, saying so."""
    rows = defaultdict(lambda: dict(calls=0, backward_calls=0, device_kernels=0, device_gb=0.0, ms=0.0))
    t0 = time.monotonic()
    for call, n in calls.items():
        if only and call.name not in only:
            continue
        if time.monotonic() - t0 > budget_s:
            say({"bench": "codegen_on_device", "stopped": f"budget of {budget_s:.0f} s spent: the rows are partial"})
            break
        launches, ms = measure(call)
        kernels, gb = sum(l.kernels for l in launches), sum(l.gb for l in launches)
        say({"bench": "codegen_on_device", "call": call.name, "count": n, "shapes": [getattr(a, "shape", None)
             for a in call.args if isinstance(a, tc.Tensor)][:2], "graphs": len(launches), "kernels": kernels,
             "gb": round(gb, 4), "ms": round(ms, 4)})
        row = rows[call.name]
        row["calls"] += n
        row["backward_calls"] += n if tc.runs_backward(call) else 0
        row["device_kernels"] += n * kernels
        row["device_gb"] += n * gb
        row["ms"] += n * ms
    return rows


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="revcol_base")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--res-small", type=int, default=64)
    p.add_argument("--functions", default="", help="comma-separated: only these (default: every function)")
    p.add_argument("--autotune", action="store_true", help="train.compile_autotune's options")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop measuring new calls after this long")
    a = p.parse_args(argv)
    only = {f for f in a.functions.split(",") if f}
    unknown = sorted(only - set(tc.FUNCTIONS))
    if unknown:
        print(f"error: --functions {','.join(unknown)}: not a compiled function here (one of "
              f"{', '.join(sorted(tc.FUNCTIONS))})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: codegen_on_device.py compiles and times on a CUDA device; on a CPU run "
              "benchmarks/triton_codegen.py (the fake device) instead", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    calls = tc.step_calls(a.model, a.batch, a.res, a.res_small)
    options = compile_setting.inductor_options(a.autotune)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    say = lambda row: print(json.dumps(row), flush=True)  # noqa: E731
    def fresh(call):
        torch._dynamo.reset()  # each call compiled afresh, its code captured whole
        return measure_call(call, options, device)

    rows = add_up(calls, fresh, only, a.budget_s, say)
    total = dict(calls=0, backward_calls=0, device_kernels=0, device_gb=0.0, ms=0.0)
    for name, row in sorted(rows.items()):
        for k in total:
            total[k] += row[k]
        say({"bench": "codegen_on_device", "function": name, **row, "device_gb": round(row["device_gb"], 3),
             "ms": round(row["ms"], 3)})
    # the fake device's rows to compare with are triton_codegen.py's under this same torch version
    say({"bench": "codegen_on_device", "model": a.model, "batch": a.batch, "res": a.res,
         "device": torch.cuda.get_device_name(), "torch": torch.__version__, "options": options,
         **total, "device_gb": round(total["device_gb"], 3), "ms": round(total["ms"], 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
