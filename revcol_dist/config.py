"""One training config: dataclasses loaded from YAML, overridable with ``--set a.b=value``.

Unknown keys and ill-typed values are errors that name the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml


# The main job's config: what every launcher runs without --config. The built-in defaults below
# equal it (tested), so a config file that sets nothing runs the main job too.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


@dataclass
class ModelSection:
    name: str = "revcol_mini"  # the main job's small RevCol; revcol_tiny ... revcol_huge are the published
    # Fields of RevColConfig to override (channels, layers, num_columns, num_classes, ...);
    # num_classes defaults to the data set's.
    args: Dict[str, Any] = field(default_factory=dict)
    # reversible (columns reconstructed in backward: memory independent of the column count) |
    # plain (autograd keeps every activation: the fastest step, where it fits) | auto (the
    # launchers ask the planner at the configured micro-batch against the GPU's memory and
    # print the choice and why; reversible on CPUs)
    memory_policy: str = "reversible"


@dataclass
class DataSection:
    # "digits": the embedded scikit-learn handwritten digits, prepared once under `root`.
    # Otherwise a folder holding train.beton/val.beton (FFCV) or train/ and val/ ImageFolders.
    dataset: str = "digits"
    root: str = "runs/data/digits"
    img_size: int = 32
    num_workers: int = 0
    backend: str = "auto"  # auto | ffcv | torch
    min_crop_scale: float = 0.75  # random-resized crop scale range (min, 1); the published 0.08 for ImageNet
    hflip: bool = False  # horizontal flips: on for natural images (the recipes), off for digits or text
    randaug: bool = False  # rand-m9-mstd0.5-inc1
    erasing: float = 0.0  # random erasing probability
    # Mixup / CutMix (batch mode, as published): Beta(alpha, alpha) mixing, enabled when alpha > 0;
    # applied with probability mixup_prob, CutMix chosen with probability mixup_switch_prob when both are on.
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5


@dataclass
class TrainSection:
    epochs: int = 15
    batch_size: int = 64  # global, across all ranks
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_lr: float = 0.0
    warmup_epochs: float = 1.0
    # Published rule: lr, warmup_lr and min_lr are given for this global batch and scaled by
    # batch_size / lr_base_batch (1024 in the published recipes). None: use the values as given.
    lr_base_batch: Optional[int] = None
    # Layer-wise LR decay: scale = layer_decay ** (num_layers - layer_id) (1.0: off).
    layer_decay: float = 1.0
    label_smoothing: float = 0.0  # used when mixup/cutmix are off (else the soft targets carry it)
    ema_decay: float = 0.0  # exponential moving average of the weights (0: off; published 0.9999)
    ema_eval: bool = True  # also evaluate (and export) the EMA weights when EMA is on
    # Skip a step whose loss (or gradient norm) is not finite; stop after this many in a row.
    max_nan_skips: int = 5
    # Fine-tuning: start from these weights (the authors' .pth, our model_official.pth, or one of
    # our checkpoint folders). Classifier heads whose shape differs are re-initialised.
    pretrained: Optional[str] = None
    weight_decay: float = 0.05
    clip_grad: Optional[float] = None
    grad_accum: int = 1
    optimizer: str = "adamw"  # adamw (betas 0.9/0.999, eps 1e-8) | sgd (momentum 0.9)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    # GPU kernels (docs/training.md, "GPU settings"): cuDNN picks the fastest convolution for the
    # (fixed) input shapes; fp32 matmuls and convolutions run on TF32 tensor cores (the reversible
    # inverse stays exact fp32: it recomputes with the same kernels); channels_last memory format.
    cudnn_benchmark: bool = True
    tf32: bool = True
    channels_last: bool = False
    # Run the ConvNeXt blocks (forward, reversible recomputation, hand-written backward) as
    # compiled graphs (torch.compile, parallel/compile.py): auto | true | false. auto compiles on
    # CUDA devices; a CPU run would wait minutes for C++ compilation it never earns back.
    compile: Any = "auto"
    # With compile: time each matmul on the device as cuBLAS against Triton templates with their
    # neighbours (GELU, layer scale, residual) fused in, and keep the faster (inductor's
    # max-autotune GEMM search; parallel/compile.AUTOTUNE_OPTIONS). Off until measured on a GPU;
    # the first steps wait minutes longer.
    compile_autotune: bool = False
    # With compile: launch a graph's independent pointwise kernels (weight-gradient casts, the
    # passes that finish reductions) as one kernel each group (inductor's combo kernels,
    # parallel/compile.COMBO_OPTIONS); the same arithmetic. Off until a GPU run has compared the
    # values and timed it (gpu_check.py's compile_combo, gpu_session.sh's gpu_step_combo).
    compile_combo: bool = False
    # Capture the step's forward and backward as one CUDA graph after three eager steps and
    # replay it (parallel/cuda_graph.py): one launch for thousands of kernels, for models and
    # batches bound by the host's launches. One process on a CUDA device.
    cuda_graph: bool = False
    seed: int = 0
    log_every: int = 20
    max_steps: Optional[int] = None  # stop early (smoke runs)
    checkpoint_every: int = 0  # steps between resumable checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    # A checkpoint that cannot be written (full disk, quota): "stop" the run with a one-line error,
    # or "continue" with a warning and try again at the next interval.
    on_save_error: str = "stop"
    # Copy the state to host memory and write it in the background while training goes on
    # (still atomic and verified; one write at a time).
    async_checkpoint: bool = False
    # Also write each checkpoint's layout-free form (fp32 weights, optimizer moments and EMA by
    # parameter name, safetensors): it resumes on another world size, ZeRO stage, DDP or the
    # pipeline (docs/resilience.md).
    portable_checkpoint: bool = True
    # Resume a checkpoint trained with another global batch (the data position is mapped to the
    # same number of samples into the epoch).
    allow_batch_change: bool = False
    # The longest a step (or an evaluation batch, or a save) may take before every rank dumps its
    # stacks, names the stuck rank and exits non-zero for a restart (0: no watchdog).
    hang_timeout_s: float = 1800.0
    eval_every_epochs: int = 0  # evaluate on the val set every N epochs (0: only at the end)
    eval_every_steps: int = 0  # also every N optimizer steps (0: off); long epochs want both
    # Global batch of the evaluation (None: train.batch_size). No gradients or activations are
    # kept, so several times the training batch usually fits.
    eval_batch_size: Optional[int] = None


@dataclass
class MonitorSection:
    tensorboard: bool = True  # event files under <output_dir>/tensorboard (rank 0 only)
    console: str = "auto"  # auto (a live bar on a terminal, lines otherwise) | rich | plain | none
    alpha_every: int = 0  # alpha histograms every N steps (0: every train.log_every)
    # With intermediate supervision: the decoders' reconstructions beside their inputs every N
    # steps (0: off)
    images_every: int = 200
    # The device's peak TFLOPS for MFU (None: from the table in monitor/throughput.py by GPU
    # name; MFU is not shown where neither knows it, e.g. on CPUs)
    peak_tflops: Optional[float] = None


@dataclass
class PipelineSection:
    """Column pipeline parallelism (docs/pipeline.md); world size = stages x replicas."""

    stages: int = 1  # 1: off
    micro_batches: int = 1  # per replica and step; train.batch_size / replicas must divide by it
    cost: str = "params"  # partition columns by params | flops
    zero_stash: bool = False  # stages keep no outputs; the next stage sends them back reconstructed
    check_every: int = 50  # zero-stash: keep and compare outputs every N steps (drift guard)
    drift_tolerance: float = 1.0e-3
    # ZeRO inside each stage's replicas: 1 shards the optimizer states over them, 2 the
    # gradients too (each replica keeps its shard's only); 0: replicated
    zero: int = 0


@dataclass
class DistributedSection:
    # How long a collective may wait for the other ranks before the process group gives up.
    timeout_s: int = 600


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    output_dir: str = "runs/default"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0])
    if tp is Any or origin in (dict, Dict):
        if origin in (dict, Dict) and not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, data: Dict[str, Any], prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}; valid keys here: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, tp)
    return cls(**kwargs)


def _apply_override(tree: Dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r} (e.g. --set train.lr=1e-3)")
    dotted, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {dotted}: cannot parse value {raw!r}: {e}") from None
    parts = dotted.strip().split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                base: Optional[Dict[str, Any]] = None) -> Config:
    """From a YAML file (or a ``base`` mapping, e.g. the config saved in a checkpoint), then overrides."""
    import copy

    tree: Dict[str, Any] = copy.deepcopy(base) if base else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for o in overrides:
        _apply_override(tree, o)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    from .models import get_variant

    try:
        get_variant(cfg.model.name).replace(**cfg.model.args)
    except (KeyError, TypeError, ValueError) as e:
        msg = e.args[0] if e.args else str(e)
        raise ConfigError(f"model: {msg}") from None
    t = cfg.train
    problems: List[str] = []
    if cfg.model.memory_policy not in ("reversible", "plain", "auto"):
        problems.append(f"model.memory_policy must be reversible, plain or auto, got {cfg.model.memory_policy!r}")
    if t.epochs < 1:
        problems.append(f"train.epochs must be >= 1, got {t.epochs}")
    if t.batch_size < 1:
        problems.append(f"train.batch_size must be >= 1, got {t.batch_size}")
    if t.lr <= 0:
        problems.append(f"train.lr must be > 0, got {t.lr}")
    if not any(t.compile is v for v in (True, False)) and t.compile != "auto":
        problems.append(f"train.compile must be auto, true or false, got {t.compile!r}")
    if t.precision not in ("fp32", "bf16", "fp16"):
        problems.append(f"train.precision must be fp32, bf16 or fp16, got {t.precision!r}")
    if t.optimizer not in ("adamw", "sgd"):
        problems.append(f"train.optimizer must be adamw or sgd, got {t.optimizer!r}")
    if t.grad_accum < 1:
        problems.append(f"train.grad_accum must be >= 1, got {t.grad_accum}")
    if not 0.0 < t.layer_decay <= 1.0:
        problems.append(f"train.layer_decay must be in (0, 1], got {t.layer_decay}")
    if not 0.0 <= t.ema_decay < 1.0:
        problems.append(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if not 0.0 <= t.label_smoothing < 1.0:
        problems.append(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    if t.lr_base_batch is not None and t.lr_base_batch < 1:
        problems.append(f"train.lr_base_batch must be >= 1 or null, got {t.lr_base_batch}")
    if t.on_save_error not in ("stop", "continue"):
        problems.append(f"train.on_save_error must be stop or continue, got {t.on_save_error!r}")
    if t.hang_timeout_s < 0 or cfg.distributed.timeout_s < 1:
        problems.append("train.hang_timeout_s must be >= 0 (0: off) and distributed.timeout_s >= 1")
    if t.max_nan_skips < 0:
        problems.append(f"train.max_nan_skips must be >= 0, got {t.max_nan_skips}")
    if t.eval_every_epochs < 0 or t.eval_every_steps < 0:
        problems.append("train.eval_every_epochs and train.eval_every_steps must be >= 0 (0: off)")
    if t.eval_batch_size is not None and t.eval_batch_size < 1:
        problems.append(f"train.eval_batch_size must be >= 1 or null (train.batch_size), got {t.eval_batch_size}")
    d = cfg.data
    for key in ("mixup", "cutmix"):
        if getattr(d, key) < 0:
            problems.append(f"data.{key} must be >= 0 (0: off), got {getattr(d, key)}")
    for key in ("mixup_prob", "mixup_switch_prob", "erasing"):
        if not 0.0 <= getattr(d, key) <= 1.0:
            problems.append(f"data.{key} must be a probability in [0, 1], got {getattr(d, key)}")
    if cfg.monitor.images_every < 0 or cfg.monitor.alpha_every < 0:
        problems.append("monitor.images_every and monitor.alpha_every must be >= 0 (0: off / every log)")
    if cfg.monitor.console not in ("auto", "rich", "plain", "none"):
        problems.append(f"monitor.console must be auto, rich, plain or none, got {cfg.monitor.console!r}")
    if t.pretrained is not None and not Path(t.pretrained).exists():
        problems.append(f"train.pretrained: {t.pretrained} does not exist (a .pth file or a checkpoint folder)")
    if cfg.data.img_size < 32:
        problems.append(f"data.img_size must be >= 32 (RevCol's stride 32), got {cfg.data.img_size}")
    pp = cfg.pipeline
    if pp.stages < 1 or pp.micro_batches < 1:
        problems.append(f"pipeline.stages and pipeline.micro_batches must be >= 1, got {pp.stages}, {pp.micro_batches}")
    if pp.zero not in (0, 1, 2):
        problems.append(f"pipeline.zero must be 0, 1 or 2, got {pp.zero}")
    elif pp.zero and pp.stages == 1:
        problems.append("pipeline.zero shards inside pipeline stages: without a pipeline use DeepSpeed's ZeRO "
                        "(--deepspeed_config ds_configs/zero2.json) and set pipeline.zero=0")
    if pp.cost not in ("params", "flops"):
        problems.append(f"pipeline.cost must be params or flops, got {pp.cost!r}")
    if pp.stages > 1 and t.grad_accum > 1:
        problems.append("pipeline micro-batches are the gradient accumulation: use pipeline.micro_batches, "
                        "not train.grad_accum")
    if problems:
        raise ConfigError("; ".join(problems))


def validate_layout(cfg: Config, world_size: int, deepspeed: Optional[Dict[str, Any]] = None) -> None:
    """What depends on the launch: the world size and the (resolved) DeepSpeed config. Runs
    before any process group exists, so bad input fails fast with one line."""
    pp, t = cfg.pipeline, cfg.train
    if t.cuda_graph and (deepspeed is not None or world_size > 1):
        raise ConfigError(f"train.cuda_graph=true captures one process's step; this launch is "
                          f"{'DeepSpeed' if deepspeed is not None else 'DDP or the pipeline'} on {world_size} ranks, "
                          f"whose collectives and hooks run outside a graph: set train.cuda_graph=false")
    if deepspeed is not None:
        if int(deepspeed.get("zero_optimization", {}).get("stage", 0)) == 0:
            raise ConfigError("the DeepSpeed config has no ZeRO stage (zero_optimization.stage 0), where DeepSpeed "
                              "would step through non-finite gradients: use zero_optimization.stage 1, 2 or 3, or "
                              "plain DDP (torchrun without --deepspeed_config)")
        if t.precision == "bf16" and deepspeed.get("bf16", {}).get("check_grad_overflow", True) is False:
            raise ConfigError("bf16.check_grad_overflow=false in the DeepSpeed config would apply steps with "
                              "non-finite gradients: remove it (train.max_nan_skips handles such steps)")
        if t.channels_last and int(deepspeed.get("zero_optimization", {}).get("stage", 0)) == 3:
            raise ConfigError("train.channels_last=true with ZeRO-3: ZeRO-3 keeps parameters as flat partitions, "
                              "which have no memory format; set train.channels_last=false or use ZeRO-1/2")
        param_off = deepspeed.get("zero_optimization", {}).get("offload_param", {}).get("device")
        if t.ema_decay > 0 and param_off == "nvme":
            raise ConfigError("the DeepSpeed config offloads parameters to NVMe, where the EMA cannot follow them "
                              "(each rank averages its resident partition): set train.ema_decay=0, or offload "
                              "parameters to the CPU (ds_configs/zero3_offload.json)")
    replicas, micro = world_size, t.grad_accum
    if pp.stages > 1:
        if deepspeed is not None:
            raise ConfigError("pipeline.stages > 1 runs its own data parallelism: drop --deepspeed_config "
                              "(or set pipeline.stages=1)")
        if world_size % pp.stages:
            raise ConfigError(f"pipeline.stages={pp.stages} does not divide the world size {world_size}: "
                              f"launch stages x replicas processes")
        replicas, micro = world_size // pp.stages, pp.micro_batches
        if t.batch_size % (replicas * micro):
            raise ConfigError(f"train.batch_size={t.batch_size} must split into {replicas} replicas x "
                              f"{micro} micro-batches (pipeline.micro_batches)")
    if t.batch_size % replicas:
        raise ConfigError(f"the global batch train.batch_size={t.batch_size} is not divisible by "
                          f"the world size {world_size}")
    if t.batch_size % (replicas * micro):
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by {replicas} ranks x "
                          f"train.grad_accum={micro}: choose a multiple of {replicas * micro}")
    if t.eval_batch_size is not None and t.eval_batch_size % replicas:
        raise ConfigError(f"train.eval_batch_size={t.eval_batch_size} is not divisible by the {replicas} "
                          f"data-parallel ranks: choose a multiple of {replicas}")
    per_rank = t.batch_size // replicas
    if (cfg.data.mixup > 0 or cfg.data.cutmix > 0) and per_rank % 2:
        raise ConfigError(f"mixup/cutmix pair samples within a rank's batch: the per-rank batch "
                          f"{t.batch_size}/{replicas}={per_rank} must be even")


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
