"""Per-GPU bytes of one RevCol training configuration, every term a documented formula
(docs/planner.md). Parameter counts come from the model itself, built on the meta device."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from ..models.flops import forward_macs, level_macs  # noqa: F401  (forward_macs: part of this module's API)
from .speed import basis

GIB = 2**30

# bytes per parameter: weights, gradients, DeepSpeed's fp32 master partition, Adam's two moments
PRECISION_BYTES = {
    "fp32": {"param": 4, "grad": 4, "master": 4, "adam": 8},
    "bf16": {"param": 2, "grad": 2, "master": 4, "adam": 8},
}
ACT_BYTES = {"fp32": 4, "bf16": 2}
# Tensors a ConvNeXt block saves for backward, in units of (channels x positions): the
# depthwise-conv input, LayerNorm input, first-Linear input (c each), GELU input, second-Linear
# input (4c each), the layer-scale product input (c): 12c.
BLOCK_SAVED_CHANNELS = 12
# The engine's hand-written block backward (reversible/lean_block.py) keeps x, the conv output
# and h (4c): 6c; 2c where h is recomputed (recompute_hidden); a recomputed level also keeps
# the GELU output (4c more).
LEAN_BLOCK_SAVED_CHANNELS = 6
LEAN_BLOCK_SAVED_CHANNELS_NO_HIDDEN = 2
LEAN_RECOMPUTE_SAVED_CHANNELS = 10
RESERVED_FRACTION = 0.08  # allocator fragmentation, CUDA context, communication buffers


@dataclass
class PlanInput:
    model: str = "revcol_huge"
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    zero: int = 3
    pipeline: int = 1  # stages S; data-parallel degree D = nodes * gpus_per_node / S
    offload: str = "none"  # none | cpu | nvme
    batch: int = 32  # micro-batch per GPU
    res: int = 224
    precision: str = "bf16"
    num_classes: int = 1000
    inter_supv: bool = True
    boundary_interval: Optional[int] = 2
    plain_columns: int = 1
    lean_blocks: bool = True
    offload_boundaries: bool = False
    persistence_threshold: int = 100_000  # ZeRO-3 keeps smaller parameters whole on every rank
    gpu_tflops: float = 989.0  # dense bf16 peak of one H100 SXM
    # Model-FLOPs utilisation: None takes it from a measurement of this GPU and model
    # (plan/measured_throughput.json), else assumes 35%; the plan says which (throughput_basis)
    mfu: Optional[float] = None
    gpu: Optional[str] = None  # the GPU's name in the measured table, e.g. "H200"
    net_gbps: float = 400.0  # per-GPU network bandwidth (one NDR InfiniBand port per GPU)
    # ZeRO-Infinity swap buffers in host memory: optimizer buffers of one sub-group each (fp32),
    # parameter buffers of param_buffer_size elements (weight precision); DeepSpeed's defaults
    sub_group_size: int = 1_000_000_000
    optimizer_buffers: int = 4
    param_buffers: int = 5
    param_buffer_size: int = 100_000_000
    fused_optimizer: bool = True  # torch's fused AdamW (engine/optim.py): no step temporaries
    reduce_bucket: int = 500_000_000  # DeepSpeed's reduce_bucket_size (elements): a flat gradient buffer
    model_args: Dict = field(default_factory=dict)

    def validate(self) -> None:
        problems = []
        world = self.nodes * self.gpus_per_node
        if self.zero not in (0, 1, 2, 3):
            problems.append(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.pipeline < 1 or world % self.pipeline:
            problems.append(f"--pipeline {self.pipeline} must divide the {world} GPUs")
        if self.pipeline > 1 and self.zero > 2:
            problems.append("the pipeline shards within its stages up to ZeRO-2 (pipeline.zero): use --zero 0, 1 or 2 "
                            "with --pipeline")
        if self.pipeline > 1 and self.offload != "none":
            problems.append("the pipeline does not offload: use --offload none with --pipeline")
        if self.offload not in ("none", "cpu", "nvme"):
            problems.append(f"--offload must be none, cpu or nvme, got {self.offload!r}")
        if self.offload == "nvme" and self.zero != 3:
            problems.append("NVMe offload (ZeRO-Infinity) needs --zero 3")
        if self.precision not in PRECISION_BYTES:
            problems.append(f"--precision must be one of {sorted(PRECISION_BYTES)}, got {self.precision!r}")
        if self.batch < 1 or self.res < 32:
            problems.append("--batch must be >= 1 and --res >= 32")
        if problems:
            raise ValueError("; ".join(problems))


def _build_meta(inp: PlanInput):
    import torch

    from ..models import create_model

    with torch.device("meta"):
        return create_model(inp.model, num_classes=inp.num_classes, inter_supv=inp.inter_supv, **inp.model_args)


def parameter_table(inp: PlanInput) -> Dict:
    """Counts per column, stem, heads; the largest parameter; how much ZeRO-3 would persist."""
    m = _build_meta(inp)
    cols: List[int] = [sum(p.numel() for p in c.parameters()) for c in m.columns]
    total = sum(p.numel() for p in m.parameters())
    stem = sum(p.numel() for p in m.stem.parameters())
    sizes = [p.numel() for p in m.parameters()]
    persistent = sum(n for n in sizes if n < inp.persistence_threshold)
    level_params = max(sum(p.numel() for p in getattr(c, f"level{l}").parameters()) for c in m.columns for l in range(4))
    return {"total": total, "columns": cols, "stem": stem, "heads": total - stem - sum(cols),
            "largest_param": max(sizes), "largest_level": level_params, "persistent": persistent,
            "config": m.config}




def boundary_bytes(channels, res: int, batch: int) -> int:
    """One column boundary: the four level maps (strides 4..32), fp32 residual stream."""
    return batch * 4 * sum(c * math.ceil(res / (4 * 2**l)) ** 2 for l, c in enumerate(channels))


def column_activation_bytes(channels, layers, res: int, batch: int, act: int,
                            per_block=BLOCK_SAVED_CHANNELS) -> List[int]:
    """Saved-for-backward bytes of each level of one column (per_block channel-sized maps per
    block: 12 under ordinary autograd; one figure, or one per level)."""
    out = []
    for l, (c, n) in enumerate(zip(channels, layers)):
        pos = math.ceil(res / (4 * 2**l)) ** 2
        k = per_block[l] if isinstance(per_block, (list, tuple)) else per_block
        out.append(batch * pos * c * (k * n + 2) * act)  # + fusion's inputs
    return out


def _kept_block_channels(cfg, inp: PlanInput, level: int) -> int:
    """Channel-sized maps a block keeps where its activations are kept (plain columns, kept levels)."""
    if not inp.lean_blocks:
        return BLOCK_SAVED_CHANNELS
    n = LEAN_BLOCK_SAVED_CHANNELS_NO_HIDDEN if level in cfg.recompute_hidden else LEAN_BLOCK_SAVED_CHANNELS
    tokens = inp.batch * math.ceil(inp.res / (4 * 2**level)) ** 2
    return n + (1 if tokens < 4 * cfg.channels[level] else 0)  # pwconv2's output kept where tokens < 4c


def training_flops(cfg, res: int, kept_levels, plain_columns: int) -> float:
    """FLOPs to train one image: forward + 2x backward + the reversible recompute of every
    column but the plain ones, of every level but the kept ones."""
    per_level = level_macs(cfg, res)
    recomputed_share = 1 - sum(per_level[l] for l in kept_levels) / sum(per_level)
    recompute = recomputed_share * (cfg.num_columns - min(plain_columns, cfg.num_columns)) / cfg.num_columns
    return 2 * forward_macs(cfg, res) * (3 + recompute)


def make_plan(inp: PlanInput) -> Dict:
    inp.validate()
    table = parameter_table(inp)
    cfg = table["config"]
    world = inp.nodes * inp.gpus_per_node
    S, D = inp.pipeline, world // inp.pipeline
    # the pipeline keeps fp32 weights and steps them itself (bf16 is autocast): no master copy
    b = PRECISION_BYTES[inp.precision] if S == 1 else {"param": 4, "grad": 4, "master": 0, "adam": 8}
    act = ACT_BYTES[inp.precision]

    # parameters held by the most loaded stage (stem on the first, heads on the last)
    from ..parallel.pipeline.partition import partition_columns

    groups = partition_columns([float(c) for c in table["columns"]], S)
    stage_params = []
    for s, g in enumerate(groups):
        n = sum(table["columns"][i] for i in g)
        n += table["stem"] if s == 0 else 0
        n += table["heads"] if s == S - 1 else 0
        stage_params.append(n)
    psi = max(stage_params)
    persistent = table["persistent"] if inp.zero == 3 else 0

    # --- model states (formulas: docs/planner.md)
    z = inp.zero
    params = b["param"] * (psi / D + persistent if z == 3 else psi)
    grads = b["grad"] * (psi / D if z >= 2 else psi)
    # pipeline.zero=2 reduces each run to its owner in the last micro-batch's backward: until
    # then every micro-batch accumulates the whole stage's gradients
    grads_in_backward = b["grad"] * psi if S > 1 else grads
    master = 0 if (z == 0 and inp.precision == "fp32") else b["master"]  # DDP in fp32 updates the weights in place
    optim = (master + b["adam"]) * (psi / D if z >= 1 else psi)
    host = 0.0
    nvme = 0.0
    if inp.offload == "cpu":  # optimizer (and ZeRO-3 weights) in host memory; it steps there on fp32 gradients
        host += optim + 4 * psi / D
        optim, grads = 0.0, 0.0
        if z == 3:
            host += params - b["param"] * persistent
            params = b["param"] * persistent
    elif inp.offload == "nvme":  # ZeRO-Infinity
        # on NVMe: optimizer states, fp32 gradient partitions, the weight partitions
        nvme += optim + 4 * psi / D + b["param"] * psi / D
        # in host memory: the swap buffers, and (measured, see docs/planner.md) the flat weight and
        # gradient partitions DeepSpeed keeps besides their NVMe copies
        host += inp.optimizer_buffers * min(inp.sub_group_size, psi / D) * 4
        host += inp.param_buffers * inp.param_buffer_size * b["param"]
        host += (b["param"] + b["grad"]) * psi / D
        optim, grads = 0.0, 0.0
        params = b["param"] * persistent
    # ZeRO-3 working set: the gathered weights of the level being computed, and the next one prefetched
    gathered = 2 * b["param"] * table["largest_level"] if z == 3 else 0

    # --- activations of one micro-batch
    cols_in_stage = max(len(g) for g in groups)
    k = inp.boundary_interval or cols_in_stage
    kept = math.ceil(cols_in_stage / k)
    one_boundary = boundary_bytes(cfg.channels, inp.res, inp.batch)
    boundaries = kept * one_boundary
    lean = inp.lean_blocks
    # levels kept in every column: the engine ignores keep_levels under ZeRO-3 and in stages
    # (keep_levels and recompute_hidden are the model's: its variant's, or model_args)
    kept_levels = set(cfg.keep_levels) if z != 3 and S == 1 else set()
    levels = column_activation_bytes(cfg.channels, cfg.layers, inp.res, inp.batch, act,
                                     LEAN_RECOMPUTE_SAVED_CHANNELS if lean else BLOCK_SAVED_CHANNELS)
    # backward recomputes one level at a time
    transient = max(b for l, b in enumerate(levels) if l not in kept_levels) if len(kept_levels) < 4 else 0
    kept_per_block = [_kept_block_channels(cfg, inp, l) for l in range(4)]
    kept_column = column_activation_bytes(cfg.channels, cfg.layers, inp.res, inp.batch, act, kept_per_block)
    n_plain = min(inp.plain_columns, cols_in_stage)
    plain = n_plain * sum(kept_column)
    kept_level_bytes = (cols_in_stage - n_plain) * sum(kept_column[l] for l in kept_levels)
    # stem output and input images (the stem's conv output is recomputed, not kept)
    stem = inp.batch * cfg.channels[0] * math.ceil(inp.res / 4) ** 2 * 4 + inp.batch * 3 * inp.res**2 * 4
    # The plain last column(s) free their activations in their own backward, before the
    # reconstructed columns recompute: the two never coexist.
    # one weight gradient in flight before it is accumulated (the largest: pwconv of level 3);
    # two in a plain forward, whose compiled blocks return both pwconv gradients from one node
    in_flight = 2 if n_plain >= cols_in_stage else 1
    grad_transient = in_flight * 4 * cfg.channels[3] ** 2 * b["grad"]
    activations = ((0 if inp.offload_boundaries else boundaries) + max(transient, plain) + kept_level_bytes + stem
                   + grad_transient)
    if inp.offload_boundaries:
        host += boundaries
    if S > 1:  # 1F1B: up to S micro-batches in flight on the first stage, one boundary each
        activations += (S - 1) * one_boundary

    # DeepSpeed's gradient reduction bucket (ZeRO >= 1), in gradient precision; the pipeline
    # without ZeRO all-reduces one flat copy of its stage's gradients (pipeline.zero reduces
    # the flat buffers its gradients are views of, in place)
    if S > 1:
        buckets = b["grad"] * psi if D > 1 and z == 0 else 0
    else:
        buckets = b["grad"] * min(inp.reduce_bucket, psi) if z >= 1 else 0
    # The optimizer step's temporaries: ZeRO-3 copies the gradient partition into an fp32 flat
    # .grad; a non-fused AdamW makes two fp32 temporaries (denominator, update) the size of the
    # tensor it updates: DeepSpeed's flat partition (ZeRO >= 1), else the largest parameter.
    step_tmp = 0.0
    if S > 1:  # torch's AdamW per parameter (pipeline.zero broadcasts the new weights after the
        # gradients are freed: a run's copy, less than they held)
        step_tmp = 0 if inp.fused_optimizer else 8 * table["largest_param"]
    elif inp.offload == "none":
        flat = psi / D if z >= 1 else table["largest_param"]
        step_tmp = (0 if inp.fused_optimizer else 8 * flat) + (4 * psi / D if z == 3 else 0)
    states = params + grads + optim + buckets  # resident for the whole run
    # Two phases peak separately: forward/backward (activations, gathered weights) and the
    # optimizer step (its temporaries); activations are freed before the step.
    compute_phase = states - grads + grads_in_backward + gathered + activations
    step_phase = states + step_tmp
    peak = max(compute_phase, step_phase)
    usable = inp.gpu_mem_gib * GIB * (1 - RESERVED_FRACTION)
    per_sample = activations / inp.batch
    max_batch = max(0, int((usable - (compute_phase - activations)) // per_sample)) if per_sample > 0 else 0
    if step_phase > usable:
        max_batch = 0

    # --- communication per optimizer step, bytes each GPU sends (ring collectives)
    ring = (D - 1) / D if D > 1 else 0.0
    if z == 3:
        comm = (2 * b["param"] + b["grad"]) * psi * ring  # all-gather fwd + bwd, reduce-scatter grads
    elif S > 1 and z >= 1:  # the owners' weights broadcast; gradients all-reduced (1) or reduced (2)
        comm = (b["param"] + (2 if z == 1 else 1) * b["grad"]) * psi * ring
    else:
        comm = 2 * b["grad"] * psi * ring  # all-reduce = reduce-scatter + all-gather
    pipe_comm = 2 * one_boundary if S > 1 else 0  # per micro-batch: boundary forward, its gradient back

    # --- compute: forward MACs (published FLOPs); training = forward + 2x backward + the
    # reversible recompute of every column but the plain ones, of every level but the kept ones
    macs = forward_macs(cfg, inp.res)
    train_flops = training_flops(cfg, inp.res, kept_levels, inp.plain_columns)
    speed = basis(inp.gpu, inp.model, inp.precision, inp.res, inp.mfu, inp.gpu_tflops,
                  lambda res, reversible: training_flops(cfg, res, set(cfg.keep_levels),
                                                         inp.plain_columns if reversible else cfg.num_columns))
    images_per_sec = inp.gpu_tflops * 1e12 * speed.mfu / train_flops
    if S > 1:  # 1F1B bubble with M = 4S micro-batches
        images_per_sec *= 1 - (S - 1) / (4 * S + S - 1)
    comm_s = (comm + pipe_comm * 4 * S) / (inp.net_gbps / 8 * 1e9)
    # a step: M = 4S micro-batches per replica (one without a pipeline), spread over its S GPUs
    step_compute_s = inp.batch * (4 * S if S > 1 else 1) / (S * images_per_sec)

    return {
        "forward_gmacs": macs / 1e9, "train_tflops_per_image": train_flops / 1e12,
        "images_per_sec_per_gpu": images_per_sec, "compute_s_per_step": step_compute_s,
        "throughput_basis": {"kind": speed.kind, "mfu": speed.mfu, "note": speed.note},
        "comm_s_per_step": comm_s,
        "input": {k2: v for k2, v in asdict(inp).items() if k2 != "model_args"},
        "world": world, "data_parallel": D, "stages": S,
        "params_total": table["total"], "params_per_stage": stage_params,
        "stage_columns": groups,
        "bytes_per_gpu": {
            "parameters": int(params), "gradients": int(grads), "optimizer": int(optim),
            "gradients_in_backward": int(grads_in_backward),
            "zero3_gathered_working_set": int(gathered), "reduce_buckets": int(buckets),
            "optimizer_step_transient": int(step_tmp),
            "kept_boundaries": int(0 if inp.offload_boundaries else boundaries),
            "recompute_transient_peak": int(transient), "plain_columns": int(plain),
            "kept_levels": int(kept_level_bytes), "stem_and_input": int(stem),
            "weight_gradient_transient": int(grad_transient),
            "pipeline_in_flight": int((S - 1) * one_boundary if S > 1 else 0),
            "compute_phase_peak": int(compute_phase), "optimizer_step_peak": int(step_phase),
            "total": int(peak),
        },
        "host_bytes_per_gpu": int(host), "nvme_bytes_per_gpu": int(nvme),
        "fits": peak <= usable,
        "largest_micro_batch": max_batch,
        "comm_bytes_per_step": int(comm), "pipeline_comm_bytes_per_micro_batch": int(pipe_comm),
    }
