"""Training-step speed on a GPU: the trainer's path for RevCol-T, -B and -L against timm's
ConvNeXt of similar FLOPs, in one process (issue 25's table).

Each row is one JSON line: the trainer's step (``LocalBackend``, bf16 autocast, ``RevColLoss``
with inter_supv, keyed drop path, AdamW over the layer-decay groups, clipping and the finite
check, the EMA) at the variant's published batch, with the memory policy reversible, plain, or
auto (the planner's choice for this GPU, ``plan/policy.py``); then the baseline a user would
pick instead: timm's ``convnext_tiny/base/large`` (eager, bf16 autocast, fused AdamW, cross
entropy), or where timm does not import, a ConvNeXt of the same stages built from this
project's blocks. Each row: images/s (timed steps after warm-up), MFU (model FLOPs, as the
trainer's monitor counts them, against the device's dense peak), peak memory, and kernels per
step (CUDA kernels in the profiler; on a CPU the aten ops dispatched, the proxy of
``ops_per_step.py``). The last line compares each RevCol row with its baseline (a ratio).

  python3 benchmarks/gpu_step.py                        # GPU: T at 64, B at 128, L at 64, 224 px
  python3 benchmarks/gpu_step.py --models revcol_base --policies reversible --compile on
  python3 benchmarks/gpu_step.py --models revcol_tiny --policies reversible --compile both --graph both
  python3 benchmarks/gpu_step.py --models revcol_base --policies plain --compile on --alone
  .venv/bin/python benchmarks/gpu_step.py --mode cpu    # tiny sizes on a CPU (CI's smoke test)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ops_per_step as ops  # noqa: E402  (the trainer step's pieces; puts the project on sys.path)

from revcol_dist.models.flops import train_flops_per_image  # noqa: E402
from revcol_dist.models.layers import ConvNeXtBlock, LayerNorm  # noqa: E402
from revcol_dist.monitor.throughput import peak_tflops  # noqa: E402
from revcol_dist.parallel.compile import apply_compile, compile_loss  # noqa: E402

# variant -> (batch on a GPU, timm's counterpart, its stages: depths, widths; its GMACs at 224 px)
VARIANTS = {"revcol_tiny": (64, "convnext_tiny", (3, 3, 9, 3), (96, 192, 384, 768), 4.5),
            "revcol_small": (64, "convnext_small", (3, 3, 27, 3), (96, 192, 384, 768), 8.7),
            "revcol_base": (128, "convnext_base", (3, 3, 27, 3), (128, 256, 512, 1024), 15.4),
            "revcol_large": (64, "convnext_large", (3, 3, 27, 3), (192, 384, 768, 1536), 34.4)}
CPU_ARGS = dict(channels=[8, 16, 24, 32], layers=[1, 1, 1, 1])  # --mode cpu: a tiny RevCol
CPU_STAGES = ((1, 1, 1, 1), (8, 16, 24, 32))


@dataclass
class Setting:
    device: torch.device
    batch: int
    res: int
    warmup: int
    steps: int
    cpu: bool


# ---- the two kinds of step ------------------------------------------------------------------

def revcol_step(name: str, policy: str, s: Setting, compiled: bool = False, graphed: bool = False,
                autotune: bool = False, combo: bool = False):
    """The trainer's step (as ops_per_step builds it), its blocks compiled or eager
    (``train.compile``), its forward and backward replayed as one CUDA graph or not
    (``train.cuda_graph``; captured within the warm-up); returns (step, model config, chosen
    policy, reason). ``autotune``, ``combo``: ``train.compile_autotune``, ``train.compile_combo``."""
    torch.manual_seed(0)
    args = CPU_ARGS if s.cpu else {}
    reason = None
    if policy == "auto":
        policy, reason = auto_policy(name, s, args)
    model = ops.create_model(name, num_classes=ops.CLASSES, inter_supv=True, **args).train()
    model.reversible = policy == "reversible"
    apply_compile(model, compiled, s.device, autotune, combo)
    compile_loss(ops.LOSS, compiled, s.device)
    if compiled and s.cpu:
        ops.count_compiled()  # the graphs callable under the CPU's op counter (dynamo refuses a dispatch mode)
    opt = partial(ops.make_optimizer, name="adamw", weight_decay=ops.WEIGHT_DECAY, layer_decay=ops.LAYER_DECAY)
    backend = ops.LocalBackend(model, ops.DistInfo(0, 1, 0), opt, s.device, "bf16", ops.CLIP)
    if graphed:
        from revcol_dist.parallel.cuda_graph import graph_forward_backward

        graph_forward_backward(backend, warmup=max(1, s.warmup - 1))  # the last warm-up step captures
    ema, streams, i = ops.ModelEMA(model, 0.9999), ops.random_streams(model), [0]
    keeps = ops.stream_keeps(model, streams)
    x, y = inputs(s)
    ids = torch.arange(s.batch, device=s.device)

    def step():
        backend.forward_backward([(x, y, ops.SampleKeys(0, i[0], ids, streams, keeps))], ops.LOSS)
        backend.step(lr=1e-4)
        ema.update()
        i[0] += 1
    return step, model.config, policy, reason


def alone_step(name: str, policy: str, s: Setting, compiled: bool = False, autotune: bool = False,
               combo: bool = False):
    """The model alone with the same heads and decoders, as issue 25 measured it: no drop path,
    torch's fused AdamW over one group, the sum of every head's logits and reconstructions as
    the loss; no layer decay, clipping, finite check, keys or EMA. What the trainer's step costs
    on top of the model is the ratio of the two rows."""
    torch.manual_seed(0)
    args = dict(CPU_ARGS if s.cpu else {}, drop_path=0.0)
    model = ops.create_model(name, num_classes=ops.CLASSES, inter_supv=True, **args).to(s.device).train()
    model.reversible = policy == "reversible"
    apply_compile(model, compiled, s.device, autotune, combo)
    if compiled and s.cpu:
        ops.count_compiled()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, _ = inputs(s)

    def step():
        with torch.autocast(s.device.type, dtype=torch.bfloat16):
            out = model(x)
            heads = [out.logits, *out.aux_logits, *out.reconstructions]
            loss = sum(h.float().mean() for h in heads)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, model.config


def auto_policy(name: str, s: Setting, args: dict):
    from revcol_dist.plan.model import GIB, PlanInput
    from revcol_dist.plan.policy import choose_memory_policy

    if s.device.type != "cuda":
        return "reversible", "no GPU memory to plan against (CPU)"
    mem = torch.cuda.get_device_properties(s.device).total_memory / GIB
    return choose_memory_policy(PlanInput(model=name, gpus_per_node=1, zero=0, batch=s.batch, res=s.res,
                                          gpu_mem_gib=mem, model_args=args))


class ConvNeXtFromBlocks(nn.Module):
    """ConvNeXt's stages (stem 4x4/4, LayerNorm + 2x2/2 downsampling) from this project's
    block: the baseline where timm is not installed."""

    def __init__(self, depths, widths, classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 4, 4), ChannelsFirstNorm(widths[0]))
        self.stages = nn.ModuleList()
        for i, (d, w) in enumerate(zip(depths, widths)):
            down = [] if i == 0 else [ChannelsFirstNorm(widths[i - 1]), nn.Conv2d(widths[i - 1], w, 2, 2)]
            self.stages.append(nn.Sequential(*down, *[ConvNeXtBlock(w, 4 * w, kernel_size=7) for _ in range(d)]))
        self.norm, self.head = nn.LayerNorm(widths[-1]), nn.Linear(widths[-1], classes)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(self.norm(x.mean((2, 3))))


class ChannelsFirstNorm(LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def baseline_step(name: str, s: Setting):
    """timm's ConvNeXt (or the same stages from this project's blocks); (step, label)."""
    _, timm_name, depths, widths, _ = VARIANTS[name]
    torch.manual_seed(0)
    try:
        if s.cpu:
            raise ImportError("tiny sizes")
        import timm

        model, label = timm.create_model(timm_name, num_classes=ops.CLASSES), f"timm {timm_name}"
    except ImportError:
        depths, widths = CPU_STAGES if s.cpu else (depths, widths)
        model, label = ConvNeXtFromBlocks(depths, widths, ops.CLASSES), f"{timm_name} stages from this project's blocks"
    model = model.to(s.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=s.device.type == "cuda")
    x, y = inputs(s)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        with torch.autocast(s.device.type, dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, label


def inputs(s: Setting):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(s.batch, 3, s.res, s.res, generator=g)
    y = torch.randint(0, ops.CLASSES, (s.batch,), generator=g)
    return x.to(s.device), y.to(s.device)


# ---- measuring one step ---------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, s: Setting) -> dict:
    for _ in range(s.warmup):
        step()
    sync(s.device)
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    t0 = time.perf_counter()
    for _ in range(s.steps):
        step()
    sync(s.device)
    seconds = (time.perf_counter() - t0) / s.steps
    peak = torch.cuda.max_memory_allocated(s.device) if s.device.type == "cuda" else None
    return {"ms_per_step": 1e3 * seconds, "images_per_sec": s.batch / seconds, "peak_gib": peak and peak / 2**30,
            **kernels_per_step(step, s)}


def kernels_per_step(step, s: Setting) -> dict:
    if s.device.type != "cuda":
        with ops.OpCounter() as c:
            step()
        return {"kernels_per_step": c.summary()["kernels"], "kernels_counted": "aten ops dispatched (CPU proxy)"}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(s.device)
    n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"kernels_per_step": n, "kernels_counted": "CUDA kernels (profiler)"}


def row(kind: str, name: str, s: Setting, extra: dict, measured: dict, flops_per_image: float) -> dict:
    peak = peak_tflops(s.device, "bf16", True)
    mfu = measured["images_per_sec"] * flops_per_image / (peak * 1e12) if peak else None
    return {"benchmark": "gpu_step", "kind": kind, "model": name, "batch": s.batch, "res": s.res,
            "device": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu",
            "torch": torch.__version__, **extra, **measured, "mfu": mfu}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["gpu", "cpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=None,
                    help="default: revcol_tiny, revcol_base, revcol_large (--mode cpu: revcol_tiny)")
    ap.add_argument("--policies", nargs="+", default=["reversible", "plain", "auto"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--compile", choices=["off", "on", "both"], default=None,
                    help="the blocks eager, compiled (train.compile), or a row each (default: both on a GPU, "
                         "off on a CPU, where compiling costs minutes)")
    ap.add_argument("--alone", action="store_true",
                    help="beside each reversible/plain row, the model alone with the same heads (issue 25: the "
                         "trainer's step should cost at most 1.15x it)")
    ap.add_argument("--graph", choices=["off", "on", "both"], default="off",
                    help="the forward and backward replayed as one CUDA graph (train.cuda_graph), with the "
                         "blocks compiled; 'both' adds a graphed row beside each compiled one (GPU only)")
    ap.add_argument("--autotune", action="store_true",
                    help="compiled rows with inductor's matmul search (train.compile_autotune: each matmul timed "
                         "as cuBLAS against Triton templates with their neighbours fused; compiling takes minutes)")
    ap.add_argument("--combo", action="store_true",
                    help="compiled rows with inductor's combined pointwise kernels (train.compile_combo=true)")
    a = ap.parse_args(argv)
    cpu = a.mode == "cpu"
    if cpu and a.graph != "off":
        print("error: --graph needs CUDA (a CUDA graph); on a CPU leave it off", file=sys.stderr)
        return 2
    compiles = {"off": [False], "on": [True], "both": [False, True]}[a.compile or ("off" if cpu else "both")]
    a.models = a.models or (["revcol_tiny"] if cpu else ["revcol_tiny", "revcol_base", "revcol_large"])
    if not cpu and not torch.cuda.is_available():
        print("error: --mode gpu needs CUDA; use --mode cpu for the tiny smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if cpu else "cuda")
    if not cpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ratios = {}
    for name in a.models:
        s = Setting(device, 4 if cpu else VARIANTS[name][0], 64 if cpu else 224, 1 if cpu else 3,
                    a.steps or (2 if cpu else 10), cpu)
        for policy in a.policies:
            kinds = [(c, False) for c in compiles if not (c and a.graph == "on")] + \
                ([(True, True)] if a.graph != "off" else [])
            for compiled, graphed in kinds:
                step, config, chosen, reason = revcol_step(name, policy, s, compiled, graphed, a.autotune, a.combo)
                r = row("revcol", name, s, {"memory_policy": policy, "ran": chosen, "reason": reason,
                                            "compiled": compiled, "compile_autotune": compiled and a.autotune,
                                            "compile_combo": compiled and a.combo,
                                            "cuda_graph": graphed}, measure(step, s),
                        train_flops_per_image(config, s.res))
                print(json.dumps(r), flush=True)
                ratios[(name, policy + (":compiled" if compiled else "") + (":graph" if graphed else ""))] = \
                    r["images_per_sec"]
                del step
                if not cpu:
                    torch.cuda.empty_cache()
                if a.alone and not graphed and chosen in ("reversible", "plain"):
                    step, config = alone_step(name, chosen, s, compiled, a.autotune, a.combo)
                    alone = row("alone", name, s, {"memory_policy": chosen, "compiled": compiled,
                                                   "compile_autotune": compiled and a.autotune,
                                                   "compile_combo": compiled and a.combo}, measure(step, s),
                                train_flops_per_image(config, s.res))
                    alone["trainer_step_over_alone"] = alone["images_per_sec"] / r["images_per_sec"]
                    alone["trainer_kernels_over_alone"] = r["kernels_per_step"] / alone["kernels_per_step"]
                    print(json.dumps(alone), flush=True)
                    del step
                    if not cpu:
                        torch.cuda.empty_cache()
        apply_compile(torch.nn.Module(), False, device)  # the baseline's blocks (ConvNeXtFromBlocks) eager
        step, label = baseline_step(name, s)
        flops = 6e9 * VARIANTS[name][4] * (s.res / 224) ** 2  # ConvNeXt's published GMACs
        b = row("baseline", name, s, {"baseline": label}, measure(step, s), flops)
        print(json.dumps(b), flush=True)
        for key in [k for k in ratios if k[0] == name]:
            ratios[key] /= b["images_per_sec"]
        del step
    print(json.dumps({"benchmark": "gpu_step", "summary": "images/s of the trainer's step over the baseline's",
                      "ratios": {f"{n}:{p}": round(v, 4) for (n, p), v in ratios.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
