"""DeepSpeed JSON stays DeepSpeed's own format; its "auto" values are filled from the
training config, and an explicit value that contradicts the training config is an error
naming both."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict

from ..config import Config, ConfigError


def _set(ds: Dict[str, Any], dotted: str, value: Any, source: str, ours: str, path: str) -> None:
    node = ds
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    cur = node.get(keys[-1], "auto")
    if cur == "auto":
        node[keys[-1]] = value
    elif cur != value and not (isinstance(cur, (int, float)) and isinstance(value, (int, float)) and float(cur) == float(value)):
        raise ConfigError(
            f"{path} sets {dotted}={cur!r} but the training config has {ours}={source} (→ {value!r}); "
            f"make them agree or set {dotted} to \"auto\" in the DeepSpeed config"
        )


def resolve_ds_config(path: str | Path, cfg: Config, world_size: int) -> Dict[str, Any]:
    path = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    ds = copy.deepcopy(raw)
    t = cfg.train
    accum = t.grad_accum
    if t.batch_size % (world_size * accum):
        raise ConfigError(
            f"the global batch train.batch_size={t.batch_size} is not divisible by world size {world_size} "
            f"x train.grad_accum {accum}: choose a batch size that is a multiple of {world_size * accum}"
        )
    micro = t.batch_size // (world_size * accum)
    _set(ds, "train_batch_size", t.batch_size, str(t.batch_size), "train.batch_size", path)
    _set(ds, "train_micro_batch_size_per_gpu", micro, f"{t.batch_size}/({world_size} ranks x {accum})",
         "train.batch_size", path)
    _set(ds, "gradient_accumulation_steps", accum, str(accum), "train.grad_accum", path)
    _set(ds, "gradient_clipping", float(t.clip_grad or 0.0), str(t.clip_grad), "train.clip_grad", path)
    _set(ds, "bf16.enabled", t.precision == "bf16", repr(t.precision), "train.precision", path)
    if "fp16" in ds or t.precision == "fp16":
        _set(ds, "fp16.enabled", t.precision == "fp16", repr(t.precision), "train.precision", path)
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(
            f"{path} defines an optimizer/scheduler: revcol-dist builds AdamW with layer-wise groups and its own "
            f"LR schedule from the training config; remove them from the DeepSpeed config"
        )
    ds.setdefault("steps_per_print", 10**9)
    return ds


def zero_stage(ds: Dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
