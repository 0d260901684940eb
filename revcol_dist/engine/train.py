"""The training loop: one code path for a single process, DDP and DeepSpeed ZeRO."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from ..config import Config, ConfigError, dump_config
from ..data.sources import build_streams, prepare_data
from ..models import create_model
from ..parallel.backends import DeepSpeedBackend, LocalBackend
from ..parallel.ds_config import zero_stage
from ..parallel.distributed import barrier, device_for, dist_env, init_distributed
from .checkpoint import CheckpointManager, atomic_save, rng_state, set_rng_state
from .losses import revcol_loss
from .schedule import lr_at


def _mean_across_ranks(x: float) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


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
        logits = backend.forward(images).logits.float()
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


def train(cfg: Config, ds_config: Optional[str] = None, resume: Optional[str] = None,
          log: Callable[[str], None] = print) -> Dict[str, float]:
    info = dist_env()
    ds = None  # checked before any process group exists: bad input fails fast
    if ds_config is not None:
        from ..parallel.ds_config import resolve_ds_config

        ds = resolve_ds_config(ds_config, cfg, info.world_size)
    elif cfg.train.batch_size % info.world_size:
        raise ConfigError(f"the global batch train.batch_size={cfg.train.batch_size} is not divisible by "
                          f"the world size {info.world_size}")
    init_distributed(info, use_deepspeed=ds_config is not None)
    device = device_for(info)
    out_dir = Path(cfg.output_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out_dir / "config.yaml")
    say = log if info.is_main else (lambda *_: None)

    if info.is_main:  # prepare the embedded data once, before the other ranks read it
        prepare_data(cfg.data)
    barrier()
    train_stream, val_stream = build_streams(cfg.data, cfg.train.batch_size, cfg.train.seed,
                                             info.rank, info.world_size)
    torch.manual_seed(cfg.train.seed)
    args = dict(cfg.model.args)
    args.setdefault("num_classes", train_stream.num_classes)
    if ds is not None and zero_stage(ds) == 3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds):  # never whole on one rank
            model = create_model(cfg.model.name, **args)
    else:
        model = create_model(cfg.model.name, **args)
    meta = _model_meta(cfg, model)
    if ds is not None:
        backend = DeepSpeedBackend(model, info, ds, cfg.train.optimizer, cfg.train.weight_decay)
    else:
        backend = LocalBackend(model, info, cfg.train.optimizer, cfg.train.weight_decay, cfg.train.clip_grad, device)
    model.train()

    ckpts = CheckpointManager(out_dir / "checkpoints", info.rank, info.world_size, cfg.train.keep_checkpoints)
    steps_per_epoch = train_stream.order.batches_in_epoch(0)
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    warmup = int(cfg.train.warmup_epochs * steps_per_epoch)
    step = 0
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
            train_stream.load_state_dict(client["data"])
            set_rng_state(client["rng"])
            say(f"resumed from {where} at step {step}")

    log_path = out_dir / "train_log.jsonl"
    t0, seen, loss_val = time.time(), 0, float("nan")
    last_ckpt: Optional[Path] = None

    def checkpoint() -> Path:
        client = {"step": step, "data": train_stream.state_dict(), "rng": rng_state()}
        return ckpts.save(backend, step, client, meta)

    while step < total:
        for images, labels, _ in train_stream:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            lr = lr_at(step, total, warmup, cfg.train.lr, cfg.train.min_lr)
            out = backend.forward(images)
            loss, _ = revcol_loss(out, labels, images, train_stream.mean, train_stream.std)
            backend.backward_and_step(loss, lr)
            step += 1
            _maybe_inject_fault(step, info)
            seen += labels.numel() * info.world_size
            loss_val = _mean_across_ranks(loss.item())
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"loss became {loss_val} at step {step}")
            if info.is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss_val, "lr": lr}) + "\n")
            if step % cfg.train.log_every == 0 or step == total:
                say(f"step {step}/{total} loss {loss_val:.4f} lr {lr:.2e} {seen / (time.time() - t0):.1f} img/s")
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < total:
                last_ckpt = checkpoint()
            if step >= total:
                break
    elapsed = time.time() - t0
    last_ckpt = checkpoint()
    official = backend.official_state_dict(last_ckpt)
    export = out_dir / "model_official.pth"
    if info.is_main:
        atomic_save({"model": official, "config": cfg.to_dict(), "step": step}, export)
    val = evaluate_distributed(backend, val_stream, device)
    metrics = {"val_top1": val["top1"], "val_top5": val["top5"], "train_loss": loss_val,
               "images_per_sec": seen / max(elapsed, 1e-9), "steps": step, "backend": backend.name,
               "world_size": info.world_size}
    if info.is_main:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    say(f"val top-1 {val['top1']:.2f}%  top-5 {val['top5']:.2f}%  checkpoint: {last_ckpt}  weights: {export}")
    barrier()
    return metrics
