"""The one short check to run when a GPU is lent for a few minutes (the project has never run
on one). It also runs on a CPU with tiny sizes, so that a CPU test keeps it from rotting.

  python benchmarks/gpu_check.py                        # auto: gpu mode where CUDA is available
  python benchmarks/gpu_check.py --mode cpu --out /tmp/gpu_check.json
  python benchmarks/gpu_check.py --only local_step,throughput

Checks, each independent (an exception is recorded in its entry, the others still run):
local_step, process_groups, reversible_gradients, offload, memory_vs_planner, throughput,
data_finish (uint8 batches normalised and erased on the device: equal to the CPU, no host sync).
Progress goes to stderr; stdout gets exactly one JSON line at the end: {"ok", "mode", "env",
"wall_s", "checks": {name: {"ok", ...numbers}}}. Exit status 0 when every check run is ok.
In gpu mode the whole run keeps under --budget-s (540 s): checks that would start later are
recorded as skipped for time, and a watchdog ends a hung run with what it has.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from revcol_dist.engine.losses import RevColLoss  # noqa: E402
from revcol_dist.engine.optim import make_optimizer  # noqa: E402
from revcol_dist.models import create_model, get_variant  # noqa: E402
from revcol_dist.parallel.backends import LocalBackend  # noqa: E402
from revcol_dist.parallel.distributed import DistInfo  # noqa: E402
from revcol_dist.randomness import SampleKeys, keyed  # noqa: E402
from revcol_dist.models.flops import forward_macs  # noqa: E402
from revcol_dist.monitor.throughput import peak_tflops  # noqa: E402

LOSS = RevColLoss((0.5,) * 3, (0.25,) * 3)
# The seconds each check may take in gpu mode (subprocess timeouts, loop deadlines).
SOFT_BUDGET_S = {"local_step": 40, "process_groups": 200, "reversible_gradients": 60, "offload": 40,
                 "memory_vs_planner": 60, "throughput": 150, "data_finish": 20}


@dataclass
class Setting:
    """What every check is told: the mode, where it computes, a scratch folder, the deadline."""

    mode: str  # "gpu" | "cpu"
    device: torch.device
    work: Path
    deadline: float  # time.monotonic() when the run's budget ends

    @property
    def gpu(self) -> bool:
        return self.mode == "gpu"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def budget(self, check: str) -> float:
        """A check's own seconds: on the GPU its soft budget, cut to what the run has left (a
        loaded 2-core CPU is slow, not stuck: there only the run's budget counts)."""
        own = SOFT_BUDGET_S[check] if self.gpu else math.inf
        return max(1.0, min(own, self.remaining()))


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Between checks: one check's tensors must not count in the next one's memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def kernel_flags(tf32: bool = False, benchmark: bool = False, deterministic: bool = False):
    """cuDNN/TF32 switches for one measurement, restored after (the trainer's GPU defaults are
    TF32 and cuDNN autotuning on; exactness checks want them off)."""
    b = torch.backends
    saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic)
    b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = tf32, tf32
    b.cudnn.benchmark, b.cudnn.deterministic = benchmark, deterministic
    try:
        yield
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic = saved


def autocast(device: torch.device, precision: str):
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def batch(n: int, res: int, classes: int, device: torch.device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, res, res, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x.to(device), y.to(device)


def keys(n: int, device: torch.device, step: int = 1, first: int = 0) -> SampleKeys:
    """Keyed drop path: every run of the same samples draws the same masks."""
    return SampleKeys(0, step, torch.arange(first, first + n, device=device))


def worst_relative(ref: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor]) -> float:
    """Worst per-parameter ||got - ref|| / ||ref|| (absolute where ref is zero, e.g. column 0's
    alphas, which multiply a zero state)."""
    worst = 0.0
    for n, r in ref.items():
        diff = (got[n].double() - r.double()).norm().item()
        denom = r.double().norm().item()
        worst = max(worst, diff / denom if denom else diff)
    return worst


def finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


# ---- 1. local_step ------------------------------------------------------------------------

def local_backend(model, device, precision: str, optimizer: str = "sgd") -> LocalBackend:
    return LocalBackend(model, DistInfo(0, 1, 0), lambda m: make_optimizer(m, optimizer, 0.0), device, precision)


def one_local_step(s: Setting, precision: str) -> dict:
    """Two micro-batches through forward_backward, then step: the trainer's path in one process."""
    name, classes, res, n = ("revcol_tiny", 1000, 224, 32) if s.gpu else ("revcol_mini", 10, 32, 4)
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, inter_supv=True, drop_path=0.1).train()
    b = local_backend(model, s.device, precision)
    x, y = batch(n, res, classes, s.device)
    half = n // 2
    micro = [(x[:half], y[:half], keys(half, s.device)), (x[half:], y[half:], keys(n - half, s.device, first=half))]
    lr = 0.1
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    out = b.forward_backward(micro, LOSS)
    with_grad, movable = moving_params(model, lr)
    applied = bool(b.step(lr=lr))  # a device tensor where the fused AdamW decides the skip
    moved = {k for k, p in model.named_parameters() if not torch.equal(before[k], p.detach())}
    loss, norm = float(out.loss), float(b.last_grad_norm)
    ok = (finite(loss) and finite(norm) and applied and movable <= moved <= with_grad
          and len(movable) >= 0.5 * len(before))
    return {"ok": ok, "model": name, "batch": n, "res": res, "loss": loss, "grad_norm": norm, "applied": applied,
            "params": len(before), "params_with_grad": len(with_grad), "params_movable": len(movable),
            "params_moved": len(moved)}


def moving_params(model, lr: float):
    """Names of the parameters with a gradient, and of those whose first SGD step (lr * grad)
    is well above their fp32 spacing: these must move. Weights behind the 1e-6 layer-scale
    init get gradients around 1e-10 at step one, which round away."""
    with_grad, movable = set(), set()
    for k, p in model.named_parameters():
        if p.grad is None or not bool(p.grad.any()):
            continue
        with_grad.add(k)
        if lr * float(p.grad.abs().max()) > 1e-5 * float(p.detach().abs().max()):
            movable.add(k)
    return with_grad, movable


def check_local_step(s: Setting) -> dict:
    runs = {p: one_local_step(s, p) for p in (("fp32", "bf16") if s.gpu else ("fp32",))}
    return {"ok": all(r["ok"] for r in runs.values()), **runs}


# ---- 2. process_groups --------------------------------------------------------------------

# A small RevCol on the embedded digits, SGD (Adam's 1/sqrt(v) turns rounding noise into full
# steps), layer decay (per-group LRs through every ZeRO wrapper), keyed drop path (every
# layout draws the same masks), the torch loader (per-sample augmentation seeds).
PG_CONFIG = """
model:
  name: revcol_tiny
  args:
    channels: [8, 16, 24, 32]
    layers: [1, 1, 1, 1]
    num_columns: 4
    drop_path: 0.2
    inter_supv: true
data:
  dataset: digits
  backend: torch
  root: {data_root}
  img_size: 32
  min_crop_scale: 0.75
  hflip: false
train:
  epochs: 1
  batch_size: 8
  optimizer: sgd
  lr: 0.05
  min_lr: 1.0e-4
  warmup_epochs: 0
  weight_decay: 0.05
  layer_decay: 0.7
  seed: 0
  log_every: 1000
  max_steps: {steps}
monitor:
  tensorboard: false
  console: plain
output_dir: {out}
"""
PG_STEPS = 3
# mode -> DeepSpeed config under ds_configs/ (None: no DeepSpeed); "single" has no launcher
PG_MODES = {"single": None, "ddp": None, "zero1": "zero1.json", "zero2": "zero2.json", "zero3": "zero3.json",
            "zero3_offload": "zero3_offload.json"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_command(mode: str, cfg: Path) -> List[str]:
    """The project's own launcher; every mode but "single" under torchrun at world size 1 (one
    GPU cannot host two NCCL ranks), so the process group is real: NCCL on GPU, gloo on CPU.
    At one rank the trainer does not wrap the model in DDP (LocalBackend does above one), so
    "ddp" checks the process group and the loss all-reduce, not DDP's gradient buckets."""
    launcher = [str(REPO / "launchers" / "pretrain.py"), "--config", str(cfg)]
    if PG_MODES[mode]:
        launcher += ["--deepspeed_config", str(REPO / "ds_configs" / PG_MODES[mode])]
    if mode == "single":
        return [sys.executable, *launcher]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *launcher]


def run_all(commands: Dict[str, List[str]], logs: Path, jobs: int, timeout: float) -> Dict[str, dict]:
    """Run the commands ``jobs`` at a time, each writing to its own log; return code and
    seconds of each (None: killed at the timeout)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    pending, running, done = list(commands), {}, {}
    deadline = time.monotonic() + timeout
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            f = open(logs / f"{name}.log", "w")
            running[name] = (subprocess.Popen(commands[name], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env),
                             f, time.monotonic())
        for name, (p, f, t0) in list(running.items()):
            killed = p.poll() is None and time.monotonic() > deadline
            if p.poll() is None and not killed:
                continue
            if killed:
                p.kill()
                p.wait()
            f.close()
            done[name] = {"rc": None if killed else p.returncode, "seconds": round(time.monotonic() - t0, 1)}
            del running[name]
        time.sleep(0.2)
    return done


def logged_losses(out: Path) -> Dict[int, float]:
    losses = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        losses[rec["step"]] = rec["loss"]
    return losses


def log_tail(path: Path, lines: int = 15) -> List[str]:
    """The worker's last words, up to torchrun's "failed (exitcode ...)" line (its own
    traceback and summary after it say nothing more), progress bars left out."""
    text = [l for l in path.read_text(errors="replace").splitlines() if "it/s]" not in l]
    end = next((i + 1 for i, l in enumerate(text) if "failed (exitcode" in l), len(text))
    return text[:end][-lines:]


def pg_entry(mode: str, run: dict, out: Path, log_file: Path, ref: Optional[Dict[int, float]], tol: float) -> dict:
    """One mode's result: its backend, losses, and worst relative difference from "single"."""
    entry = {"seconds": run["seconds"]}
    if run["rc"] != 0:
        why = "timed out" if run["rc"] is None else f"exit {run['rc']}"
        return {**entry, "ok": False, "error": f"{why}: " + " | ".join(log_tail(log_file))}
    metrics = json.loads((out / "metrics.json").read_text())
    losses = logged_losses(out)
    entry.update(backend=metrics["backend"], world_size=metrics["world_size"],
                 losses=[losses[k] for k in sorted(losses)])
    if ref is None or sorted(losses) != sorted(ref):
        return {**entry, "ok": False, "error": "no reference losses to compare with" if ref is None else "other steps"}
    worst = max(abs(losses[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref)
    stage = PG_MODES[mode][4] if PG_MODES[mode] else None
    right_backend = stage is None or metrics["backend"] == f"zero{stage}"
    ok = worst < tol and right_backend and all(finite(v) for v in losses.values()) and len(losses) == PG_STEPS
    return {**entry, "worst_rel_loss_diff": worst, "ok": ok}


def check_process_groups(s: Setting) -> dict:
    from revcol_dist.data.digits import prepare_digits

    root = s.work / "process_groups"
    root.mkdir(parents=True, exist_ok=True)
    prepare_digits(root / "digits")  # once, before several processes would race to write it
    commands = {}
    for mode in PG_MODES:
        cfg = root / f"{mode}.yaml"
        cfg.write_text(PG_CONFIG.format(data_root=root / "digits", steps=PG_STEPS, out=root / mode))
        commands[mode] = pg_command(mode, cfg)
    # One GPU hosts all six small runs at once (their start-up is most of their time); on a
    # CPU, one run per core.
    jobs = len(commands) if s.gpu else max(1, min(len(commands), os.cpu_count() or 1))
    runs = run_all(commands, root, jobs, s.budget("process_groups"))
    # TF32 and cuDNN autotuning (the trainer's GPU defaults) may pick other kernels per process
    tol = 1e-3 if s.gpu else 1e-5
    ref = logged_losses(root / "single") if runs["single"]["rc"] == 0 else None
    modes = {m: pg_entry(m, runs[m], root / m, root / f"{m}.log", ref, tol) for m in PG_MODES}
    worst = max((e.get("worst_rel_loss_diff", 0.0) for e in modes.values()), default=0.0)
    return {"ok": all(e["ok"] for e in modes.values()), "tolerance": tol, "worst_rel_loss_diff": worst,
            "steps": PG_STEPS, "parallel_jobs": jobs, "modes": modes}


# ---- 3. reversible_gradients, 4. offload ----------------------------------------------------

def grad_model(s: Setting):
    """RevCol-T (published sizes on GPU, narrow on CPU) with drop path, inter_supv, and layer
    scales as a trained model has them (the 1e-6 init would hide the blocks and their masks)."""
    args = {} if s.gpu else dict(channels=(8, 16, 24, 32), layers=(1, 1, 2, 1))
    torch.manual_seed(0)
    model = create_model("revcol_tiny", num_classes=10, inter_supv=True, drop_path=0.2, **args).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gamma"):
                p.fill_(0.1)
    return model.to(s.device)


def grad_inputs(s: Setting):
    return batch(8, 224, 10, s.device) if s.gpu else batch(2, 64, 10, s.device)


def gradients(model, x, y, reversible: bool, precision: str = "fp32"):
    """Loss and parameter gradients of one forward+backward, drop-path masks keyed by sample."""
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    with keyed(keys(x.shape[0], x.device)):
        with autocast(x.device, precision):
            loss, _ = LOSS(model(x), y, x)
        loss.backward()
    return float(loss.detach()), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def low_precision_entry(ref, plain, rev) -> dict:
    """bf16 (or TF32) rounds every op to 2-3 significant digits, and the reversible and plain
    paths round differently (different kernels, fp32 residual stream in the engine), so they
    cannot agree to fp32's 1e-4. What matters is that reversibility adds little error of its
    own: ok if the reversible gradients are no further from the exact (fp32) ones than 2x the
    plain path's own bf16 error, or if reversible and plain agree to 5e-2 anyway."""
    rev_vs_plain, plain_vs_ref = worst_relative(plain, rev), worst_relative(ref, plain)
    rev_vs_ref = worst_relative(ref, rev)
    ok = rev_vs_ref <= 2 * plain_vs_ref or rev_vs_plain < 5e-2
    return {"ok": ok, "rev_vs_plain": rev_vs_plain, "plain_vs_fp32": plain_vs_ref, "rev_vs_fp32": rev_vs_ref}


def check_reversible_gradients(s: Setting) -> dict:
    model = grad_model(s)
    x, y = grad_inputs(s)
    with kernel_flags(tf32=False):
        loss_plain, ref = gradients(model, x, y, False)
        loss_rev, rev = gradients(model, x, y, True)
        fp32_err = worst_relative(ref, rev)
        entry = {"fp32": {"ok": fp32_err < 1e-4, "rev_vs_plain": fp32_err, "loss_plain": loss_plain,
                          "loss_rev": loss_rev}}
        entry["bf16"] = low_precision_entry(ref, gradients(model, x, y, False, "bf16")[1],
                                            gradients(model, x, y, True, "bf16")[1])
    if s.gpu:  # the trainer's fp32 default on GPU computes convolutions and matmuls in TF32
        with kernel_flags(tf32=True):
            entry["tf32"] = low_precision_entry(ref, gradients(model, x, y, False)[1], gradients(model, x, y, True)[1])
    return {"ok": all(e["ok"] for e in entry.values()), "batch": x.shape[0], "res": x.shape[-1], **entry}


def with_policy(model, **fields):
    model.policy = type(model.policy)(**{**model.policy.__dict__, **fields})
    return model


def peak_bytes_of(fn: Callable[[], object], device: torch.device):
    """fn's result and its peak allocated bytes above what was allocated before (None on CPU)."""
    if device.type != "cuda":
        return fn(), None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    sync(device)
    return result, torch.cuda.max_memory_allocated(device) - base


@contextlib.contextmanager
def offloaders():
    """The engine's Offloaders made inside the block, for their byte counters: an equal
    gradient proves nothing if nothing was offloaded."""
    from revcol_dist.reversible.offload import Offloader

    made, init = [], Offloader.__init__

    def recording(self, *args, **kw):
        init(self, *args, **kw)
        made.append(self)

    Offloader.__init__ = recording
    try:
        yield made
    finally:
        Offloader.__init__ = init


def check_offload(s: Setting) -> dict:
    """Boundaries kept at every column, on the device or in host memory (pinned, copied on a
    side stream on CUDA): offloading copies bytes, so the gradients must be bitwise equal (a
    race, or a boundary fetched back in another memory layout, shows as a difference)."""
    model = grad_model(s)
    x, y = grad_inputs(s)
    got, peaks = {}, {}
    with kernel_flags(deterministic=True), offloaders() as made:  # the same kernels in both runs
        for offload in (False, True):
            with_policy(model, boundary_interval=1, offload_boundaries=offload)
            got[offload], peaks[offload] = peak_bytes_of(lambda: gradients(model, x, y, True)[1], s.device)
    moved = sum(o.bytes_offloaded for o in made)
    max_abs = max((got[True][n] - g).abs().max().item() for n, g in got[False].items())
    rel = worst_relative(got[False], got[True])
    return {"ok": max_abs == 0.0 and moved > 0, "max_abs_diff": max_abs, "worst_rel_diff": rel,
            "bytes_offloaded": moved, "bytes_fetched": sum(o.bytes_fetched for o in made),
            "peak_bytes_on_device": peaks[False], "peak_bytes_offloaded": peaks[True]}


# ---- 5. memory_vs_planner -------------------------------------------------------------------

def planned_bytes(model, n: int, res: int) -> dict:
    from revcol_dist.plan.model import PlanInput, make_plan

    c = model.config
    plan = make_plan(PlanInput(model=c.name, nodes=1, gpus_per_node=1, zero=0, batch=n, res=res, precision="fp32",
                               num_classes=c.num_classes, inter_supv=c.inter_supv,
                               boundary_interval=c.boundary_interval, plain_columns=c.plain_columns,
                               lean_blocks=c.lean_blocks))
    return plan["bytes_per_gpu"]


def check_memory_vs_planner(s: Setting) -> dict:
    """RevCol-T as published (inter_supv, drop path 0.1), fp32, AdamW, one process: the peak of
    the second step (the first creates Adam's moments) against the planner's total, within 15%."""
    if not s.gpu:
        return {"ok": True, "skipped": True, "reason": "needs CUDA memory statistics"}
    n, res = 64, 224
    free_memory()
    base = torch.cuda.memory_allocated(s.device)
    torch.manual_seed(0)
    model = create_model("revcol_tiny", num_classes=1000, inter_supv=True, drop_path=0.1).train()
    b = local_backend(model, s.device, "fp32", "adamw")
    x, y = batch(n, res, 1000, s.device)
    with kernel_flags():  # no autotuning workspaces in the figure
        for step in (1, 2):
            if step == 2:
                sync(s.device)
                torch.cuda.reset_peak_memory_stats(s.device)
            b.forward_backward([(x, y, keys(n, s.device, step))], LOSS)
            b.step(lr=1e-3)
        sync(s.device)
    measured = torch.cuda.max_memory_allocated(s.device) - base
    inputs = x.numel() * x.element_size() + y.numel() * y.element_size()
    resident = torch.cuda.memory_allocated(s.device) - base - inputs
    plan = planned_bytes(model, n, res)
    ratio = plan["total"] / measured
    return {"ok": 0.85 <= ratio <= 1.15, "batch": n, "res": res,
            "measured_peak_bytes": measured, "planned_peak_bytes": plan["total"], "planned_over_measured": ratio,
            "measured_resident_after_step_bytes": resident,
            "planned_states_bytes": plan["parameters"] + plan["optimizer"], "planner_terms": plan}


# ---- 6. throughput ----------------------------------------------------------------------------

def peak_flops(device: torch.device) -> Optional[float]:
    """bf16 dense peak FLOPS of the device (the trainer's table), None where unknown."""
    tf = peak_tflops(device, "bf16", tf32=True)
    return tf * 1e12 if tf else None


def timed_steps(b: LocalBackend, x, y, warmup: int, steps: int) -> float:
    """Seconds per training step (forward, backward, optimizer), between synchronisations (CUDA
    events on the GPU: the device's time, not the host's launches)."""
    device = x.device
    n = x.shape[0]
    for i in range(warmup):
        b.forward_backward([(x, y, keys(n, device, i))], LOSS)
        b.step(lr=1e-4)
    sync(device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if device.type == "cuda" else None
    t0 = time.perf_counter()
    if events:
        events[0].record()
    for i in range(steps):
        b.forward_backward([(x, y, keys(n, device, warmup + i))], LOSS)
        b.step(lr=1e-4)
    if events:
        events[1].record()
    sync(device)
    seconds = events[0].elapsed_time(events[1]) / 1e3 if events else time.perf_counter() - t0
    return seconds / steps


# Training-step timing: the published resolution and a batch that fits RevCol-B's plain
# autograd in bf16 on the GPU; a few steps of the small model on a CPU (MFU unknown there).
TIMING = {"gpu": dict(models=("revcol_tiny", "revcol_base"), batch=64, res=224, warmup=3, steps=8, precision="bf16"),
          "cpu": dict(models=("revcol_mini",), batch=2, res=64, warmup=1, steps=2, precision="fp32")}


def throughput_of(s: Setting, name: str, reversible: bool) -> dict:
    t = TIMING[s.mode]
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000, inter_supv=True).train()
    model.reversible = reversible
    b = local_backend(model, s.device, t["precision"], "adamw")
    x, y = batch(t["batch"], t["res"], 1000, s.device)
    with kernel_flags(tf32=True, benchmark=True):  # the trainer's GPU defaults
        step_s, peak = peak_bytes_of(lambda: timed_steps(b, x, y, t["warmup"], t["steps"]), s.device)
    ips = t["batch"] / step_s
    peak_f = peak_flops(s.device)
    # model FLOPs (forward + 2x backward), as the trainer reports MFU: the recomputation is not counted
    mfu = ips * 6 * forward_macs(model.config, t["res"]) / peak_f if peak_f else None
    return {"images_per_sec": ips, "step_s": step_s, "mfu": mfu, "peak_bytes": peak, "loss": float(b.last_loss)}


def check_throughput(s: Setting) -> dict:
    t = TIMING[s.mode]
    deadline = time.monotonic() + s.budget("throughput")
    out = {}
    for name in t["models"]:
        if time.monotonic() > deadline:
            out[name] = {"ok": False, "skipped": True, "reason": "time budget"}
            continue
        rev, plain = throughput_of(s, name, True), throughput_of(s, name, False)
        free_memory()
        out[name] = {"ok": all(r["images_per_sec"] > 0 and finite(r["loss"]) for r in (rev, plain)),
                     "forward_gmacs": forward_macs(get_variant(name), t["res"]) / 1e9, "reversible": rev,
                     "plain": plain, "reversible_over_plain": rev["images_per_sec"] / plain["images_per_sec"]}
    return {"ok": all(e["ok"] for e in out.values()), "peak_flops": peak_flops(s.device),
            **{k: v for k, v in t.items() if k != "models"}, **out}


WARM_CALLS = 7


def check_data_finish(s: Setting) -> dict:
    """The input pipeline's device half: a uint8 batch normalised and erased on the device in
    batched ops equals the CPU computation, and (CUDA) makes no host sync (sync debug mode
    "error" raises on one) and launches it in at most 1 ms of host time, warm."""
    import numpy as np

    from revcol_dist.data import draws
    from revcol_dist.data.transforms import erase_batch, normalize

    n, res = (128, 224) if s.gpu else (8, 32)
    gen = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=gen)
    index = torch.randint(0, 2**40, (n,), generator=gen)
    bank = torch.from_numpy(np.array(draws.noise_bank(3, draws.bank_size(3, res, res))))
    ref = erase_batch(normalize(u8), index, 3, 1, 0.25, bank)
    x, i, b = u8.to(s.device), index.to(s.device), bank.to(s.device)
    normalize(x[:1])  # the mean/std constants reach the device once, before the timed call
    sync(s.device)
    if s.device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        times = []
        for _ in range(WARM_CALLS):  # the first call pays kernel loading and allocations: warm is the median
            t0 = time.perf_counter()
            out = erase_batch(normalize(x), i, 3, 1, 0.25, b)
            times.append(1e3 * (time.perf_counter() - t0))
    finally:
        if s.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    sync(s.device)
    diff = (out.cpu() - ref).abs().max().item()
    erased = int((ref != normalize(u8)).flatten(1).any(1).sum())
    warm_ms = sorted(times[1:])[len(times[1:]) // 2]
    fast = warm_ms <= 1.0 or s.device.type != "cuda"  # on a GPU the host only launches; a CPU computes
    return {"ok": diff <= 1e-6 and 0 < erased < n and fast, "max_abs_diff": diff, "erased": erased, "batch": n,
            "res": res, "host_ms_first": times[0], "host_ms_warm": warm_ms, "host_ms_limit": 1.0}


def _loss_gap(a: Sequence[float], b: Sequence[float]) -> float:
    """The largest relative difference between two runs' losses, step by step."""
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


def graph_run(s: Setting, graphed: bool, steps: int = 8, compiled: bool = False, combo: bool = False):
    """``steps`` training steps of a narrow RevCol-T (keyed drop path, inter_supv, AdamW,
    clipping), eager or with the forward and backward captured after two eager steps
    (``train.cuda_graph``); each step's loss and the final weights. After the fourth step one
    alpha is set below the reconstruction threshold: the eager steps keep that level's input
    from the sixth step on (the minima reach the host a step late), a graph must capture anew.
    Each step's loss is read after the next step's forward and backward are queued, as the
    Trainer reads it (``Trainer.settle``): the host is never ahead by more than a step.
    ``combo``: ``train.compile_combo`` for the compiled graphs."""
    from revcol_dist.models.layers import random_streams, stream_keeps
    from revcol_dist.parallel.compile import apply_compile, compile_loss
    from revcol_dist.parallel.cuda_graph import graph_forward_backward

    torch.manual_seed(0)
    model = create_model("revcol_tiny", channels=(16, 24, 32, 40), layers=(1, 1, 2, 1), num_classes=7,
                         drop_path=0.3, inter_supv=True).train()
    loss_fn = RevColLoss((0.5,) * 3, (0.25,) * 3)
    apply_compile(model, compiled, s.device, combo=combo)
    compile_loss(loss_fn, compiled, s.device)
    b = LocalBackend(model, DistInfo(0, 1, 0), lambda m: make_optimizer(m, "adamw", 0.05, 0.9), s.device, "fp32",
                     clip_grad=1.0)
    wrapper = graph_forward_backward(b, warmup=2) if graphed else None
    streams = random_streams(model)
    keeps = stream_keeps(model, streams)
    losses, unread = [], None
    for i in range(steps):
        x, y = batch(8, 64, 7, s.device, seed=i)
        out = b.forward_backward([(x, y, SampleKeys(3, i, torch.arange(8 * i, 8 * i + 8, device=s.device), streams,
                                                    keeps))], loss_fn)
        if unread is not None:
            losses.append(float(unread.loss))
        b.step(lr=1e-3 * (i + 1))
        unread = out
        if i == 3:
            with torch.no_grad():
                model.columns[1].alpha0.fill_(0.05)
    losses.append(float(unread.loss))
    apply_compile(model, False, s.device)
    compile_loss(loss_fn, False, s.device)
    return losses, {k: p.detach().clone() for k, p in model.named_parameters()}, wrapper


def check_cuda_graph(s: Setting) -> dict:
    """``train.cuda_graph``: eight steps with the forward and backward captured after two eager
    ones train as the eager steps do (every loss, the final weights; deterministic kernels,
    fp32), eager blocks and compiled; captured twice (the second time for an alpha set below the
    reconstruction threshold), replayed five times."""
    if not s.gpu:
        return {"ok": True, "skipped": True, "reason": "needs CUDA (tests/parallel/test_cuda_graph.py covers the rest)"}
    entry, ok = {}, True
    with kernel_flags(deterministic=True):
        for compiled in (False, True):
            ref_losses, ref_weights, _ = graph_run(s, graphed=False, compiled=compiled)
            again_losses, again_weights, _ = graph_run(s, graphed=False, compiled=compiled)
            losses, weights, wrapper = graph_run(s, graphed=True, compiled=compiled)
            # eager against eager: the spread of kernels with atomics (the decoders' upsampling backward)
            spread = max(_loss_gap(ref_losses, again_losses), worst_relative(ref_weights, again_weights))
            # the graph's step 6 still reconstructs the level the eager step 6 keeps (its check reads
            # a step older minima): the reversible engine's own tolerance, 1e-5, covers that
            tol = max(1e-5, 10 * spread)
            loss_diff, weight_diff = _loss_gap(ref_losses, losses), worst_relative(ref_weights, weights)
            good = (wrapper.captures, wrapper.replays) == (2, 5) and loss_diff <= tol and weight_diff <= tol
            ok &= good
            entry["compiled" if compiled else "eager"] = {
                "ok": good, "captures": wrapper.captures, "replays": wrapper.replays, "losses": losses,
                "eager_spread": spread, "tolerance": tol, "worst_rel_loss_diff": loss_diff,
                "worst_rel_weight_diff": weight_diff}
    return {"ok": ok, **entry}


def check_compile_combo(s: Setting) -> dict:
    """``train.compile_combo``: eight compiled steps with the graphs' independent pointwise
    kernels combined train as without (every loss, the final weights; deterministic kernels,
    fp32): the same arithmetic, so the same values within what two runs without it differ by
    (the kernels with atomics)."""
    if not s.gpu:
        return {"ok": True, "skipped": True, "reason": "needs CUDA (on a CPU inductor combines nothing)"}
    with kernel_flags(deterministic=True):
        ref_losses, ref_weights, _ = graph_run(s, graphed=False, compiled=True)
        again_losses, again_weights, _ = graph_run(s, graphed=False, compiled=True)
        losses, weights, _ = graph_run(s, graphed=False, compiled=True, combo=True)
    spread = max(_loss_gap(ref_losses, again_losses), worst_relative(ref_weights, again_weights))
    tol = max(1e-6, 10 * spread)
    loss_diff, weight_diff = _loss_gap(ref_losses, losses), worst_relative(ref_weights, weights)
    return {"ok": loss_diff <= tol and weight_diff <= tol, "losses": losses, "spread_without": spread,
            "tolerance": tol, "worst_rel_loss_diff": loss_diff, "worst_rel_weight_diff": weight_diff}


def check_late_read(s: Setting) -> dict:
    """``Trainer.settle``'s read (``engine/step_values.py``): a step's values, read after more
    work was queued behind it, wait for that step only, so the device is still busy when they
    arrive; a plain ``float`` of the same tensor waits for everything queued (the reference)."""
    if not s.gpu:
        return {"ok": True, "skipped": True, "reason": "needs CUDA (tests/engine/test_step_values.py covers the values)"}
    from revcol_dist.engine.step_values import StepValues
    from revcol_dist.parallel.backends import StepLoss

    a = torch.randn(4096, 4096, device=s.device)
    entry = {}
    for way in ("step_values", "float"):
        sync(s.device)
        loss = (a @ a).mean()  # the step
        values = StepValues(1, StepLoss(loss, {"twice": loss * 2}), torch.isfinite(loss).all(), 0.1)
        for _ in range(40):  # the next step's work, queued behind it (~5 TFLOP)
            a.mul_(1.0)
            _ = a @ a
        t0 = time.perf_counter()
        got = values.loss if way == "step_values" else float(loss)
        entry[way] = {"host_wait_ms": 1e3 * (time.perf_counter() - t0),
                      "device_busy_after_read": not torch.cuda.current_stream(s.device).query()}
        sync(s.device)
        entry[way]["value_ok"] = got == float(loss) and values.parts["twice"] == float(loss * 2) and values.applied
    ok = entry["step_values"]["device_busy_after_read"] and entry["step_values"]["value_ok"]
    return {"ok": ok, **entry}


CHECKS: Dict[str, Callable[[Setting], dict]] = {
    "local_step": check_local_step,
    "process_groups": check_process_groups,
    "reversible_gradients": check_reversible_gradients,
    "offload": check_offload,
    "memory_vs_planner": check_memory_vs_planner,
    "throughput": check_throughput,
    "data_finish": check_data_finish,
    "cuda_graph": check_cuda_graph,
    "compile_combo": check_compile_combo,
    "late_read": check_late_read,
}


# ---- running ------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    cuda = torch.cuda.is_available()
    try:
        ds = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        ds = None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "gpus": torch.cuda.device_count() if cuda else 0,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            platform.processor() or platform.machine(), "deepspeed": ds, "cpu_count": os.cpu_count()}


def run_check(name: str, s: Setting) -> dict:
    """One check; an exception becomes its entry (ok false, the error), the others go on."""
    if s.remaining() <= 0:
        return {"ok": False, "skipped": True, "reason": "time budget"}
    log(f"{name}: start ({s.remaining():.0f} s of the budget left)")
    t0 = time.monotonic()
    try:
        entry = CHECKS[name](s)
    except Exception as e:  # noqa: BLE001 - recorded, and the next check runs
        traceback.print_exc(file=sys.stderr)
        entry = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    finally:
        free_memory()
    entry["seconds"] = round(time.monotonic() - t0, 2)
    log(f"{name}: {'ok' if entry['ok'] else 'FAILED'} in {entry['seconds']} s")
    return entry


class Report:
    """The one JSON line, written once: at the end, or by the watchdog if a check hangs."""

    def __init__(self, mode: str, env: dict, out: Optional[str], stdout_fd: int) -> None:
        self.data = {"ok": False, "mode": mode, "env": env, "wall_s": None, "checks": {}}
        self.out, self.fd, self.t0 = out, stdout_fd, time.monotonic()
        self.lock = threading.Lock()
        self.written = False

    def emit(self, error: Optional[str] = None) -> bool:
        with self.lock:
            if self.written:
                return False
            self.written = True
            self.data["wall_s"] = round(time.monotonic() - self.t0, 2)
            self.data["ok"] = error is None and bool(self.data["checks"]) and all(
                c["ok"] for c in self.data["checks"].values())
            if error:
                self.data["error"] = error
            line = json.dumps(self.data, default=str)
            if self.out:
                Path(self.out).write_text(line + "\n")
            os.write(self.fd, (line + "\n").encode())
            return self.data["ok"]


def start_watchdog(report: Report, seconds: float) -> threading.Timer:
    """A hung collective or kernel would hold the lent machine: past ``seconds``, write what
    there is and leave."""
    def fire():
        try:
            report.emit(error=f"hard time limit of {seconds:.0f} s reached")
        finally:
            os._exit(1)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


@contextlib.contextmanager
def scratch(keep: Optional[str]):
    """The checks' scratch folder: kept where --work names one (its logs explain a failure)."""
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep)
        return
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        yield Path(work)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("auto", "gpu", "cpu"), default="auto",
                    help="auto: gpu where torch.cuda.is_available()")
    ap.add_argument("--out", help="also write the JSON line to this file")
    ap.add_argument("--only", help=f"comma-separated subset of: {','.join(CHECKS)}")
    ap.add_argument("--work", help="scratch folder to keep (launcher logs, run outputs); default: a temporary one")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="checks starting after this many seconds are skipped (the run must end within 10 min)")
    args = ap.parse_args(argv)
    args.checks = list(CHECKS) if not args.only else [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in args.checks if c not in CHECKS]
    if unknown:
        ap.error(f"unknown check(s) {unknown}; choose from {list(CHECKS)}")
    if args.mode == "auto":
        args.mode = "gpu" if torch.cuda.is_available() else "cpu"
    if args.mode == "gpu" and not torch.cuda.is_available():
        ap.error("--mode gpu but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    stdout_fd = os.dup(1)
    os.dup2(2, 1)  # anything a library prints goes to stderr: stdout holds the one JSON line
    device = torch.device("cuda", 0) if args.mode == "gpu" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    report = Report(args.mode, environment(device), args.out, stdout_fd)
    watchdog = start_watchdog(report, args.budget_s + 50)
    with scratch(args.work) as work:
        s = Setting(args.mode, device, work, time.monotonic() + args.budget_s)
        for name in args.checks:
            report.data["checks"][name] = {"ok": False, "error": "did not finish"}  # what the watchdog would tell
            report.data["checks"][name] = run_check(name, s)
        watchdog.cancel()
        ok = report.emit()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
