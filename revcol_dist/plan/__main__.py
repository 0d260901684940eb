"""python -m revcol_dist.plan --model revcol_huge --nodes 8 --gpus-per-node 8 --gpu-mem 80 --zero 3
       [--pipeline S] [--offload cpu|nvme] --batch B --res 224 [--json]

Per-GPU bytes of parameters, gradients, optimizer states, kept column boundaries and the
transient peak of one column's recomputation; communication per step; the largest micro-batch
that fits. Formulas: docs/planner.md."""

from __future__ import annotations

import argparse
import json
import sys

from .model import GIB, PlanInput, make_plan


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def _peak(gpu, precision: str) -> float:
    """The named GPU's dense peak at this precision (monitor/throughput.py's table); 989 (an
    H100's bf16) without a name."""
    from ..monitor.throughput import PEAK_TFLOPS

    if gpu:
        for key, (bf16, _tf32, fp32) in PEAK_TFLOPS.items():
            if key.lower() in gpu.lower():
                return bf16 if precision == "bf16" else fp32
        raise ValueError(f"--gpu {gpu}: not in the peak table ({', '.join(PEAK_TFLOPS)}); give --gpu-tflops")
    return 989.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m revcol_dist.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="revcol_huge")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    ap.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3])
    ap.add_argument("--pipeline", type=int, default=1, help="pipeline stages S")
    ap.add_argument("--offload", default="none", choices=["none", "cpu", "nvme"])
    ap.add_argument("--batch", type=int, default=32, help="micro-batch per GPU")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--no-inter-supv", action="store_true", help="one head (fine-tuning / deploy)")
    ap.add_argument("--boundary-interval", type=int, default=2, help="0: keep only the last boundary")
    ap.add_argument("--offload-boundaries", action="store_true")
    ap.add_argument("--gpu", default=None, help="the GPU by name (H200, H100, A100, ...): its peak, and the "
                                                "throughput measured on it (plan/measured_throughput.json)")
    ap.add_argument("--gpu-tflops", type=float, default=None,
                    help="peak dense TFLOPs per GPU (default: the --gpu's at --precision, else 989, an H100's bf16)")
    ap.add_argument("--mfu", type=float, default=None,
                    help="model-FLOPs utilisation to assume (default: measured on --gpu where the table has the "
                         "model, else 0.35, said as assumed)")
    ap.add_argument("--net-gbps", type=float, default=400.0, help="network bandwidth per GPU, Gb/s")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = ap.parse_args(argv)
    try:
        inp = PlanInput(model=a.model, nodes=a.nodes, gpus_per_node=a.gpus_per_node, gpu_mem_gib=a.gpu_mem,
                        zero=a.zero, pipeline=a.pipeline, offload=a.offload, batch=a.batch, res=a.res,
                        precision=a.precision, num_classes=a.num_classes, inter_supv=not a.no_inter_supv,
                        boundary_interval=a.boundary_interval or None, offload_boundaries=a.offload_boundaries,
                        gpu_tflops=a.gpu_tflops or _peak(a.gpu, a.precision), mfu=a.mfu, gpu=a.gpu,
                        net_gbps=a.net_gbps)
        plan = make_plan(inp)
    except (ValueError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(plan))
        return 0
    b = plan["bytes_per_gpu"]
    print(f"{a.model}: {plan['params_total']:,} parameters; {plan['world']} GPUs = {plan['stages']} stage(s) x "
          f"{plan['data_parallel']} data-parallel; ZeRO-{a.zero}, offload {a.offload}, {a.precision}, "
          f"micro-batch {a.batch} at {a.res}px")
    if plan["stages"] > 1:
        print(f"  stage columns: {plan['stage_columns']}  parameters: {[f'{n:,}' for n in plan['params_per_stage']]}")
    for k, v in b.items():
        print(f"  {k:<28}{_gib(v)}")
    print(f"  {'host memory (offload)':<28}{_gib(plan['host_bytes_per_gpu'])}")
    print(f"  {'NVMe (offload)':<28}{_gib(plan['nvme_bytes_per_gpu'])}")
    print(f"  communication per step     {_gib(plan['comm_bytes_per_step'])} sent per GPU")
    print(f"  compute: {plan['forward_gmacs']:.1f} GMACs forward/image, {plan['train_tflops_per_image']:.3f} TFLOPs "
          f"to train one; {plan['images_per_sec_per_gpu']:.0f} img/s per GPU of {inp.gpu_tflops:g} TFLOPs; "
          f"step {plan['compute_s_per_step']:.2f} s compute, {plan['comm_s_per_step']:.2f} s communication at "
          f"{inp.net_gbps:g} Gb/s")
    print(f"  throughput basis: {plan['throughput_basis']['note']}")
    print(f"  fits in {a.gpu_mem:g} GiB: {'yes' if plan['fits'] else 'NO'}; largest micro-batch: "
          f"{plan['largest_micro_batch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
