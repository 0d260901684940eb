"""Top-1/top-5 of saved weights on a val set, in one process or across ranks (each reads its shard)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import Config, ConfigError, load_config
from ..data.sources import build_streams, prepare_data
from ..models import create_model
from ..models.official import CheckpointError, load_official_checkpoint, safe_load
from ..parallel import comm
from ..parallel.backends import Backend
from ..parallel.distributed import device_for, dist_env, init_distributed
from .pretrained import folder_state_dict


@torch.no_grad()
def evaluate(backend: Backend, stream, device, on_batch: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Top-1/top-5 and loss over every sample once (each rank reads its shard). Counts stay on
    the device until one all-reduce at the end: no host sync per batch. ``on_batch``: called
    after each batch (the hang watchdog's heartbeat)."""
    backend.model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, top5, loss sum
    for images, labels, _ in stream:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with backend.autocast():
            out = backend.forward(images)
        if out is None:  # a pipeline stage without the final head
            continue
        logits = out.logits.float()
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices == labels[:, None]
        counts[0] += labels.numel()  # a scalar argument: no host-to-device copy
        counts[1:] += torch.stack([hit[:, 0].sum().double(), hit.any(1).sum().double(),
                                   F.cross_entropy(logits, labels, reduction="sum").double()])
        if on_batch is not None:
            on_batch()
    counts = comm.all_reduce(counts).cpu()
    backend.model.train()
    n = max(counts[0].item(), 1.0)
    return {"top1": 100 * counts[1].item() / n, "top5": 100 * counts[2].item() / n, "loss": counts[3].item() / n,
            "n": int(counts[0].item())}


def resolve_eval_config(checkpoint: Path, config: Optional[str], overrides: Sequence[str]) -> Config:
    """--config wins; else the training config our exports and checkpoint folders carry."""
    if config is not None:
        return load_config(config, overrides)
    saved = None
    if checkpoint.is_file():
        obj = safe_load(checkpoint)
        cfg = obj.get("config") if hasattr(obj, "get") else None
        saved = cfg if isinstance(cfg, dict) and "model" in cfg and "data" in cfg else None
    elif (checkpoint.parent.parent / "config.yaml").is_file():  # <output_dir>/checkpoints/step_*
        return load_config(checkpoint.parent.parent / "config.yaml", overrides)
    if saved is None:  # the main job's config would not fit the authors' models: ask
        raise ConfigError(f"{checkpoint} carries no revcol-dist training config: pass --config configs/NAME.yaml "
                          f"(model and val data)")
    return load_config(None, overrides, base=saved)


def evaluate_checkpoint(checkpoint: str, config: Optional[str] = None, overrides: Sequence[str] = (),
                        use_ema: bool = False) -> Dict[str, float]:
    src = Path(checkpoint)
    if not src.exists():
        raise CheckpointError(f"checkpoint not found: {src}")
    cfg = resolve_eval_config(src, config, overrides)
    info = dist_env()
    init_distributed(info)
    device = device_for(info)
    if info.is_main:
        prepare_data(cfg.data)
    comm.barrier()
    batch = max((cfg.train.eval_batch_size or cfg.train.batch_size) // info.world_size, 1) * info.world_size
    _, val = build_streams(cfg.data, batch, cfg.train.seed, info.rank, info.world_size, device=device)
    args = dict(cfg.model.args)
    args.setdefault("num_classes", val.num_classes)
    model = create_model(cfg.model.name, **args)
    if src.is_dir():
        if use_ema:
            raise CheckpointError(f"{src}: EMA weights are exported in <output_dir>/model_official.pth "
                                  f"(entry state_dict_ema); evaluate that file with --ema")
        load_official_checkpoint(model, folder_state_dict(src), strict=True)
    else:
        load_official_checkpoint(model, src, strict=True, use_ema=use_ema)
    model.to(device)
    res = evaluate(Backend(model, info, cfg.train.precision), val, device)
    res.update({"checkpoint": str(src), "ema": use_ema})
    return res
