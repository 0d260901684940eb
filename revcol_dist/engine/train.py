"""The training loop: one code path for a single process, DDP and DeepSpeed ZeRO."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from ..config import Config, ConfigError, dump_config
from ..data.mixup import Mixup
from ..data.sources import build_streams, prepare_data
from ..models import create_model
from ..models.official import rename_to_official
from ..monitor.console import Console
from ..monitor.model_stats import alpha_stats
from ..monitor.system import peak_memory_bytes
from ..monitor.tensorboard import Scalars
from ..parallel.backends import DeepSpeedBackend, LocalBackend
from ..parallel.ds_config import zero_stage
from ..parallel.distributed import barrier, device_for, dist_env, init_distributed
from .checkpoint import CheckpointManager, atomic_save, rng_state, set_rng_state
from .ema import ModelEMA
from .losses import revcol_loss
from .schedule import lr_at


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message says what to change."""


def _mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().double().cpu()
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def _max_across_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _model_meta(cfg: Config, model) -> dict:
    c = model.config
    return {"model": cfg.model.name, "channels": list(c.channels), "layers": list(c.layers),
            "num_columns": c.num_columns, "num_classes": c.num_classes}


@torch.no_grad()
def evaluate_distributed(backend, stream, device) -> Dict[str, float]:
    """Top-1/top-5 over every sample once (each rank reads its shard)."""
    backend.model.eval()
    counts = torch.zeros(4, dtype=torch.float64)  # n, top1, top5, loss sum
    for images, labels, _ in stream:
        images, labels = images.to(device), labels.to(device)
        with backend.autocast():
            out = backend.forward(images)
        if out is None:  # a pipeline stage without the final head
            continue
        logits = out.logits.float()
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices == labels[:, None]
        counts += torch.tensor([labels.numel(), hit[:, 0].sum().item(), hit.any(1).sum().item(),
                                torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()],
                               dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    backend.model.train()
    n = max(counts[0].item(), 1.0)
    return {"top1": 100 * counts[1].item() / n, "top5": 100 * counts[2].item() / n, "loss": counts[3].item() / n,
            "n": int(counts[0].item())}


def _maybe_inject_fault(step: int, info) -> None:
    """Fault injection for resilience tests: REVCOL_FAULT_STEP=N kills the last rank right after
    step N, on the first attempt only (torchrun counts restarts in TORCHELASTIC_RESTART_COUNT)."""
    at = os.environ.get("REVCOL_FAULT_STEP")
    if at and step == int(at) and info.rank == info.world_size - 1 \
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os._exit(13)


def _nan_injected(step: int, info) -> bool:
    """Fault injection: REVCOL_NAN_STEPS=3,4 makes rank 0's loss NaN at those (1-based) steps."""
    steps = os.environ.get("REVCOL_NAN_STEPS")
    return bool(steps) and info.rank == 0 and step in {int(s) for s in steps.split(",")}


def train(cfg: Config, ds_config: Optional[str] = None, resume: Optional[str] = None,
          log: Optional[Callable[[str], None]] = None) -> Dict[str, float]:
    info = dist_env()
    ds = None  # checked before any process group exists: bad input fails fast
    if ds_config is not None:
        from ..parallel.ds_config import resolve_ds_config

        ds = resolve_ds_config(ds_config, cfg, info.world_size)
        param_off = ds.get("zero_optimization", {}).get("offload_param", {}).get("device")
        if cfg.train.ema_decay > 0 and param_off == "nvme":
            raise ConfigError(f"{ds_config} offloads parameters to NVMe, where the EMA cannot follow them "
                              f"(each rank averages its resident partition): set train.ema_decay=0, or offload "
                              f"parameters to the CPU (ds_configs/zero3_offload.json)")
    pipe = cfg.pipeline
    replicas, replica = info.world_size, info.rank  # data-parallel replicas (pipeline: of the whole pipeline)
    if pipe.stages > 1:
        if ds_config is not None:
            raise ConfigError("pipeline.stages > 1 runs its own data parallelism: drop --deepspeed_config "
                              "(or set pipeline.stages=1)")
        if info.world_size % pipe.stages:
            raise ConfigError(f"pipeline.stages={pipe.stages} does not divide the world size {info.world_size}: "
                              f"launch stages x replicas processes")
        replicas, replica = info.world_size // pipe.stages, info.rank // pipe.stages
        if cfg.train.batch_size % (replicas * pipe.micro_batches):
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} must split into {replicas} replicas x "
                              f"{pipe.micro_batches} micro-batches (pipeline.micro_batches)")
    if ds_config is None and cfg.train.batch_size % replicas:
        raise ConfigError(f"the global batch train.batch_size={cfg.train.batch_size} is not divisible by "
                          f"the world size {info.world_size}")
    per_rank = cfg.train.batch_size // replicas
    if (cfg.data.mixup > 0 or cfg.data.cutmix > 0) and per_rank % 2:
        raise ConfigError(f"mixup/cutmix pair samples within a rank's batch: the per-rank batch "
                          f"{cfg.train.batch_size}/{replicas}={per_rank} must be even")
    init_distributed(info, use_deepspeed=ds_config is not None)
    device = device_for(info)
    out_dir = Path(cfg.output_dir)
    console = Console(cfg.monitor.console, enabled=info.is_main, log_every=cfg.train.log_every)
    say = (log if log is not None else console.print) if info.is_main else (lambda *_: None)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out_dir / "config.yaml")

    if info.is_main:  # prepare the embedded data once, before the other ranks read it
        prepare_data(cfg.data)
    barrier()
    # every stage of a pipeline replica reads the same batches
    train_stream, val_stream = build_streams(cfg.data, cfg.train.batch_size, cfg.train.seed, replica, replicas)
    torch.manual_seed(cfg.train.seed)
    args = dict(cfg.model.args)
    args.setdefault("num_classes", train_stream.num_classes)
    if ds is not None and zero_stage(ds) == 3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds):  # never whole on one rank
            model = create_model(cfg.model.name, **args)
    else:
        model = create_model(cfg.model.name, **args)
    if cfg.train.pretrained:
        from .pretrained import load_pretrained

        say(load_pretrained(model, cfg.train.pretrained).summary())
    meta = _model_meta(cfg, model)
    t = cfg.train
    if pipe.stages > 1:
        from ..parallel.pipeline.backend import PipelineBackend

        backend = PipelineBackend(model, info, pipe, t.optimizer, t.weight_decay, t.clip_grad, t.layer_decay,
                                  t.precision, res=cfg.data.img_size, mean=train_stream.mean, std=train_stream.std,
                                  log=say)
    elif ds is not None:
        backend = DeepSpeedBackend(model, info, ds, t.optimizer, t.weight_decay, t.layer_decay, t.precision)
    else:
        backend = LocalBackend(model, info, t.optimizer, t.weight_decay, t.clip_grad, device, t.layer_decay,
                               t.precision)
    model.train()
    ema = ModelEMA(backend.model, t.ema_decay) if t.ema_decay > 0 else None
    mixer = Mixup(train_stream.num_classes, cfg.data.mixup, cfg.data.cutmix, cfg.data.mixup_prob,
                  cfg.data.mixup_switch_prob, t.label_smoothing, t.seed)
    mixer = mixer if mixer.enabled else None
    lr_scale = t.batch_size / t.lr_base_batch if t.lr_base_batch else 1.0
    base_lr, min_lr, warmup_lr = t.lr * lr_scale, t.min_lr * lr_scale, t.warmup_lr * lr_scale

    ckpts = CheckpointManager(out_dir / "checkpoints", info.rank, info.world_size, t.keep_checkpoints)
    steps_per_epoch = train_stream.order.batches_in_epoch(0)
    total = steps_per_epoch * t.epochs
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    warmup = int(t.warmup_epochs * steps_per_epoch)
    step, nan_skipped, nan_run = 0, 0, 0
    if resume:
        where = ckpts.latest() if resume == "auto" else Path(resume)
        if where is None:
            say(f"no complete checkpoint under {ckpts.root}: starting from scratch")
        else:
            saved = ckpts.read_meta(where)
            mismatch = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
            if mismatch:
                raise ConfigError(f"{where} is a checkpoint of {saved.get('model')} "
                                  f"({', '.join(f'{k}={a}' for k, (a, _) in mismatch.items())}), but this run builds "
                                  f"{cfg.model.name} ({', '.join(f'{k}={b}' for k, (_, b) in mismatch.items())})")
            if saved["world_size"] != info.world_size:
                raise ConfigError(f"{where} was written by {saved['world_size']} ranks; this run has "
                                  f"{info.world_size}: resume with the same world size")
            backend.load(where)
            client = ckpts.load_client(where)
            step = client["step"]
            nan_skipped = client.get("nan_skipped", 0)
            train_stream.load_state_dict(client["data"])
            set_rng_state(client["rng"])
            if ema is not None:
                if "ema" not in client:
                    raise ConfigError(f"{where} holds no EMA but train.ema_decay={t.ema_decay}: "
                                      f"resume with train.ema_decay=0 or start a new run")
                ema.load_state_dict(client["ema"])
            say(f"resumed from {where} at step {step}")

    fused = getattr(backend, "fused", False)
    tb = Scalars(out_dir / "tensorboard", enabled=cfg.monitor.tensorboard and info.is_main)
    log_path = out_dir / "train_log.jsonl"
    t0, seen, loss_val = time.time(), 0, float("nan")
    window_t, window_seen, window_steps = time.time(), 0, 0
    last_ckpt: Optional[Path] = None
    alpha_every = cfg.monitor.alpha_every or t.log_every
    n_heads = len(model.heads)

    def checkpoint() -> Path:
        client = {"step": step, "data": train_stream.state_dict(), "rng": rng_state(), "nan_skipped": nan_skipped}
        if ema is not None:
            client["ema"] = ema.state_dict()
        return ckpts.save(backend, step, client, meta)

    def validate(tag: str) -> Dict[str, float]:
        res = {"": evaluate_distributed(backend, val_stream, device)}
        if ema is not None and t.ema_eval:
            with ema.applied():
                res["_ema"] = evaluate_distributed(backend, val_stream, device)
        scalars = {}
        for suffix, r in res.items():
            scalars[f"val{suffix}/top1"], scalars[f"val{suffix}/top5"] = r["top1"], r["top5"]
            scalars[f"val{suffix}/loss"] = r["loss"]
        tb.add(scalars, step)
        say(f"{tag}: " + "  ".join(f"{k} {v:.2f}" for k, v in scalars.items()))
        return scalars

    try:
        while step < total:
            epoch = step // steps_per_epoch
            console.start_epoch(epoch, t.epochs, min(steps_per_epoch, total - epoch * steps_per_epoch))
            for images, labels, _ in train_stream:
                t_step = time.time()
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                targets = labels
                if mixer is not None:
                    images, targets = mixer(images, labels, step, replica)
                lr = lr_at(step, total, warmup, base_lr, min_lr, warmup_lr)
                smoothing = 0.0 if mixer is not None else t.label_smoothing
                if fused:  # pipeline: forward and backward interleaved over micro-batches
                    if _nan_injected(step + 1, info):
                        images = images * float("nan")
                    loss_val, applied = backend.train_step(images, targets, lr, smoothing)
                    parts = {}
                else:
                    with backend.autocast():
                        out = backend.forward(images)
                        loss, parts = revcol_loss(out, targets, images, train_stream.mean, train_stream.std,
                                                  label_smoothing=smoothing)
                    if _nan_injected(step + 1, info):
                        loss = loss * float("nan")
                    loss_val = float(_mean_across_ranks(loss.detach().reshape(1)))  # NaN on one rank: NaN on all
                    applied = math.isfinite(loss_val) and backend.backward_and_step(loss, lr)
                step += 1
                _maybe_inject_fault(step, info)
                if applied:
                    nan_run = 0
                    if ema is not None:
                        ema.update()
                else:
                    nan_skipped += 1
                    nan_run += 1
                    say(f"step {step}: non-finite loss or gradients ({loss_val}); step skipped "
                        f"({nan_run} in a row, {nan_skipped} in all)")
                    if nan_run > t.max_nan_skips:
                        raise TrainingError(
                            f"the loss or gradients were non-finite for {nan_run} steps in a row (last at step "
                            f"{step}); lower train.lr, set train.clip_grad, or use train.precision=bf16/fp32 "
                            f"(train.max_nan_skips={t.max_nan_skips})")
                n_img = labels.numel() * replicas
                seen += n_img
                window_seen += n_img
                window_steps += 1
                if info.is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, "loss": loss_val, "lr": lr, "skipped": not applied}) + "\n")
                in_epoch = step - epoch * steps_per_epoch
                now = time.time()
                ips = window_seen / max(now - window_t, 1e-9)  # over the current logging window
                if step % t.log_every == 0 or step == total or step == 1:
                    names = sorted(parts)
                    avg = _mean_across_ranks(torch.stack([parts[k].float().cpu() for k in names])) if names else []
                    scalars = {"train/loss": loss_val, "train/lr": lr, "train/grad_norm": backend.last_grad_norm,
                               "train/images_per_sec": ips, "train/step_time": (now - window_t) / max(window_steps, 1),
                               "sys/mem_peak_bytes": peak_memory_bytes(device),
                               "rev/drift": backend.engine.last_drift if fused else model.drift.last_drift}
                    for k, v in zip(names, avg):
                        tag = k.replace("loss_cls_final", f"loss_cls_{n_heads - 1}")
                        scalars[f"train/{tag}"] = float(v)
                    if step % alpha_every == 0 or step == total:
                        stats = alpha_stats(model)  # collective under ZeRO-3
                        if fused:  # each pipeline stage has its own columns' alphas
                            every = [None] * info.world_size
                            dist.all_gather_object(every, stats)
                            stats = {k: v for d in every for k, v in d.items()}
                        scalars.update(stats)
                    tb.add(scalars, step)
                    window_t, window_seen, window_steps = now, 0, 0
                # the live bar moves every step; plain lines appear every log_every (Console decides)
                console.update(in_epoch, step, total, {"loss": loss_val, "lr": lr, "images_per_sec": ips})
                if t.checkpoint_every and step % t.checkpoint_every == 0 and step < total:
                    last_ckpt = checkpoint()
                if step >= total or in_epoch >= steps_per_epoch:
                    break
            console.end_epoch()
            done_epoch = step // steps_per_epoch
            if t.eval_every_epochs and step % steps_per_epoch == 0 and done_epoch % t.eval_every_epochs == 0 \
                    and step < total:
                validate(f"epoch {done_epoch}")
    finally:
        console.end_epoch()
    elapsed = time.time() - t0
    last_ckpt = checkpoint()
    official = backend.official_state_dict(last_ckpt)
    ema_sd = None
    if ema is not None:  # pipeline: every stage averages its own weights; gather them like the weights
        ema_sd = backend.gather_to_main(dict(zip(ema.names, ema.shadow))) if fused else ema.full_state_dict(info.is_main)
    export = out_dir / "model_official.pth"
    if info.is_main:
        payload = {"model": official, "config": cfg.to_dict(), "step": step}
        if ema_sd is not None:
            payload["state_dict_ema"] = rename_to_official(ema_sd, model.config.inter_supv)
        atomic_save(payload, export)
    val = validate("final")
    peak = _max_across_ranks(peak_memory_bytes(device))
    metrics = {"val_top1": val["val/top1"], "val_top5": val["val/top5"], "train_loss": loss_val,
               "images_per_sec": seen / max(elapsed, 1e-9), "peak_mem_bytes": int(peak), "steps": step,
               "nan_skipped": nan_skipped, "backend": backend.name, "world_size": info.world_size,
               "elapsed_s": elapsed}
    if "val_ema/top1" in val:
        metrics["val_ema_top1"], metrics["val_ema_top5"] = val["val_ema/top1"], val["val_ema/top5"]
    tb.close()
    if info.is_main:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        rows = {"val top-1 / top-5": f"{metrics['val_top1']:.2f}% / {metrics['val_top5']:.2f}%"}
        if "val_ema_top1" in metrics:
            rows["EMA val top-1 / top-5"] = f"{metrics['val_ema_top1']:.2f}% / {metrics['val_ema_top5']:.2f}%"
        rows.update({"final train loss": f"{loss_val:.4f}", "steps (skipped)": f"{step} ({nan_skipped})",
                     "throughput": f"{metrics['images_per_sec']:.1f} img/s ({backend.name}, {info.world_size} ranks)",
                     "time": f"{elapsed:.0f} s", "peak memory / rank": f"{peak / 2**20:.0f} MiB",
                     "checkpoint (resume)": str(last_ckpt), "weights (released format)": str(export),
                     "metrics": str(out_dir / "metrics.json")})
        if tb.log_dir is not None and cfg.monitor.tensorboard:
            exe = Path(sys.executable).parent / "tensorboard"  # the venv's, where there is one
            rows["TensorBoard"] = f"{exe if exe.is_file() else 'tensorboard'} --logdir {out_dir / 'tensorboard'}"
        console.summary(f"{cfg.model.name} on {cfg.data.dataset}", rows)
    barrier()
    return metrics
