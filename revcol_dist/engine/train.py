"""Single-process training loop on the embedded data (the distributed engines build on it)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F

from ..config import Config, dump_config
from ..data.sources import build_streams
from ..models import create_model, to_official_state_dict
from .checkpoint import atomic_save
from .evaluate import evaluate
from .schedule import lr_at


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay for 1-D parameters (norms, biases, layer scales)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def classification_loss(out, labels: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(out.logits, labels)
    for a in out.aux_logits:
        loss = loss + F.cross_entropy(a, labels)
    return loss


def train(cfg: Config, log=print) -> Dict[str, float]:
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "config.yaml")
    train_stream, val_stream = build_streams(cfg.data, cfg.train.batch_size, seed=cfg.train.seed)
    args = dict(cfg.model.args)
    args.setdefault("num_classes", train_stream.num_classes)
    model = create_model(cfg.model.name, **args)
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    steps_per_epoch = train_stream.order.batches_in_epoch(0)
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    warmup = int(cfg.train.warmup_epochs * steps_per_epoch)
    step, t0, seen, loss_val = 0, time.time(), 0, float("nan")
    model.train()
    while step < total:
        for images, labels, _ in train_stream:
            if step >= total:
                break
            lr = lr_at(step, total, warmup, cfg.train.lr, cfg.train.min_lr)
            for grp in opt.param_groups:
                grp["lr"] = lr
            loss = classification_loss(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
            opt.step()
            loss_val = loss.item()
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"loss became {loss_val} at step {step}")
            seen += labels.numel()
            step += 1
            if step % cfg.train.log_every == 0 or step == total:
                log(f"step {step}/{total} loss {loss_val:.4f} lr {lr:.2e} {seen / (time.time() - t0):.1f} img/s")
    val = evaluate(model, val_stream)
    ckpt = out_dir / "checkpoint.pth"
    atomic_save({"model": to_official_state_dict(model), "config": cfg.to_dict(), "step": step}, ckpt)
    metrics = {
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "train_loss": loss_val,
        "images_per_sec": seen / (time.time() - t0),
        "steps": step,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log(f"val top-1 {val['top1']:.2f}%  top-5 {val['top5']:.2f}%  checkpoint: {ckpt}")
    return metrics
