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
            stride, n = [0] * len(a.shape), 1
            for d in reversed(a.order):
                stride[d], n = n, n * max(a.shape[d], 1)
            t = torch.empty_strided(a.shape, stride, dtype=a.dtype, device=device)
            t = t.normal_() if t.is_floating_point() else t.zero_()
            return t.requires_grad_(a.requires_grad and t.is_floating_point())
        if isinstance(a, tuple):
            return tuple(build(x) for x in a)
        return a
    return [build(a) for a in call.args]


def measure_call(call: tc.Call, options: dict, device: torch.device, reps: int = 10):
    """(launches of each code torch.compile generated for the call: its forward, and its
    backward where the call's backward ran; milliseconds per call)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()  # each call compiled afresh, its code captured whole
    fn = torch.compile(tc.FUNCTIONS[call.name], dynamic=False, fullgraph=True, options=options)
    args = real_arguments(call, device)
    backward = call.grad and call.backward and any(tc._requires_grad(call.args))

    def run():
        with torch.autocast(device.type, dtype=call.autocast or torch.bfloat16, enabled=call.autocast is not None), \
                torch.set_grad_enabled(call.grad):
            out = fn(*args)
        if backward:
            outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            wanted = [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.requires_grad]
            torch.autograd.grad(outs, wanted, [torch.ones_like(o) for o in outs], allow_unused=True)

    _, codes = run_and_get_code(run)
    launches = [fake_cuda.parse_launches(code) for code in codes]
    for _ in range(2):
        run()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()  # the host's launches included: where they bound the step, they count
    for _ in range(reps):
        run()
    sync()
    return launches, (time.perf_counter() - t0) / reps * 1e3


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="revcol_base")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--res-small", type=int, default=64)
    p.add_argument("--functions", default="", help="comma-separated: only these (default: every function)")
    p.add_argument("--autotune", action="store_true", help="train.compile_autotune's options")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: codegen_on_device.py compiles and times on a CUDA device; on a CPU run "
              "benchmarks/triton_codegen.py (the fake device) instead", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    only = {f for f in a.functions.split(",") if f}
    calls = tc.step_calls(a.model, a.batch, a.res, a.res_small)
    options = compile_setting.inductor_options(a.autotune)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    rows = defaultdict(lambda: dict(calls=0, backward_calls=0, device_kernels=0, device_gb=0.0, ms=0.0))
    for call, n in calls.items():
        if only and call.name not in only:
            continue
        launches, ms = measure_call(call, options, device)
        row = rows[call.name]
        row["calls"] += n
        row["backward_calls"] += n if call.grad and call.backward and any(tc._requires_grad(call.args)) else 0
        row["device_kernels"] += n * sum(l.kernels for l in launches)
        row["device_gb"] += n * sum(l.gb for l in launches)
        row["ms"] += n * ms
        torch.cuda.empty_cache()
    total = dict(calls=0, backward_calls=0, device_kernels=0, device_gb=0.0, ms=0.0)
    for name, row in sorted(rows.items()):
        for k in total:
            total[k] += row[k]
        print(json.dumps({"bench": "codegen_on_device", "function": name, **row, "device_gb": round(row["device_gb"], 3),
                          "ms": round(row["ms"], 3)}), flush=True)
    print(json.dumps({"bench": "codegen_on_device", "model": a.model, "batch": a.batch, "res": a.res,
                      "device": torch.cuda.get_device_name(), "torch": torch.__version__, "options": options,
                      **total, "device_gb": round(total["device_gb"], 3), "ms": round(total["ms"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
