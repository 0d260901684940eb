"""The authors' released checkpoint format: safe loading, key adapter, variant detection."""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

from .config import RevColConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model it was given to."""


class _Builtin:
    """Stands in for a builtin function referenced by a released file; never callable."""

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("a builtin referenced by the checkpoint is not callable here")


# Objects the released files carry besides tensors, mapped to inert stand-ins: yacs'
# CfgNode (a dict subclass) comes back as an OrderedDict, so nothing of yacs runs.
_ALLOWED = [(OrderedDict, "yacs.config.CfgNode"), (_Builtin, "builtins.input")]


def safe_load(path: Union[str, os.PathLike]) -> Mapping:
    """torch.load with weights_only=True plus an allow-list for the released files' extras.

    Anything else (arbitrary classes, functions, code) is refused, never executed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_ALLOWED):
            try:  # mapped, not read: a pipeline stage touches only its own tensors' pages
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as e:  # pickle.UnpicklingError and friends carry the offending global
        first = _unpickler_reason(str(e)) or type(e).__name__
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint in the released format "
            f"({first}). Only tensors, containers and the released files' config objects are allowed."
        ) from e


def _unpickler_reason(msg: str) -> str:
    """The informative line of torch's weights_only error (what it refused)."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    for ln in lines:
        if "WeightsUnpickler error:" in ln and ln.split("WeightsUnpickler error:", 1)[1].strip():
            return ln.split("WeightsUnpickler error:", 1)[1].strip()
    useful = [ln for ln in lines[1:] if not ln.startswith(("Check the documentation", "Please file", "WeightsUnpickler"))]
    return useful[0] if useful else (lines[0] if lines else "")


# internal prefix -> released prefix (heads depend on inter_supv).
_COLUMN = (re.compile(r"^columns\.(\d+)\."), r"subnet\1.")
_COLUMN_BACK = (re.compile(r"^subnet(\d+)\."), r"columns.\1.")


def to_official_key(key: str, inter_supv: bool) -> str:
    key = _COLUMN[0].sub(_COLUMN[1], key)
    if key.startswith("heads."):
        idx, rest = key[len("heads.") :].split(".", 1)
        return f"cls_blocks.{idx}.{rest}" if inter_supv else f"cls.{rest}"
    if key.startswith("decoders."):
        return "decoder_blocks." + key[len("decoders.") :]
    return key


def rename_to_official(state_dict: Mapping[str, torch.Tensor], inter_supv: bool) -> Dict[str, torch.Tensor]:
    """A state_dict under our key names, renamed to the released ones."""
    return {to_official_key(k, inter_supv): v for k, v in state_dict.items()}


def to_official_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's weights under the released key names (load with the authors' code or ours)."""
    model = getattr(model, "module", model)  # DDP / DeepSpeed engine wrappers
    return rename_to_official(model.state_dict(), model.config.inter_supv)


@dataclass
class ArchInfo:
    channels: tuple
    layers: tuple
    num_columns: int
    kernel_size: int
    level0_up2: bool
    inter_supv: bool
    num_classes: Optional[int]

    def same_backbone(self, cfg: RevColConfig) -> bool:
        return (self.channels, self.layers, self.num_columns, self.kernel_size, self.level0_up2) == (
            tuple(cfg.channels),
            tuple(cfg.layers),
            cfg.num_columns,
            cfg.kernel_size,
            cfg.level0_up2,
        )

    def describe(self) -> str:
        from .registry import get_variant, list_models

        name = next(
            (n for n, v in ((n, get_variant(n)) for n in list_models()) if (v.channels, v.layers, v.num_columns, v.level0_up2)
             == (self.channels, self.layers, self.num_columns, self.level0_up2)),
            "an unregistered variant",
        )
        return (
            f"{name} (channels {list(self.channels)}, layers {list(self.layers)}, "
            f"{self.num_columns} columns, kernel {self.kernel_size}, {self.num_classes} classes)"
        )


def inspect_state_dict(sd: Mapping[str, torch.Tensor]) -> ArchInfo:
    """Read the architecture off released key names and shapes."""
    cols = {int(m.group(1)) for k in sd if (m := re.match(r"subnet(\d+)\.", k))}
    if not cols or "subnet0.alpha0" not in sd:
        raise CheckpointError(
            "this state_dict has no 'subnet{i}.*' keys: it is not a RevCol checkpoint in the released format"
        )
    channels = tuple(int(sd[f"subnet0.alpha{l}"].shape[1]) for l in range(4))
    layers = tuple(
        len({int(m.group(1)) for k in sd if (m := re.match(rf"subnet0\.level{l}\.blocks\.(\d+)\.", k))})
        for l in range(4)
    )
    kernel = int(sd["subnet0.level0.blocks.0.dwconv.weight"].shape[-1])
    up2 = any(".level0.fusion.up2." in k for k in sd)
    inter = any(k.startswith("cls_blocks.") for k in sd)
    head = next((k for k in ("cls.classifier.1.weight", "cls_blocks.0.classifier.1.weight") if k in sd), None)
    classes = int(sd[head].shape[0]) if head else None
    return ArchInfo(channels, layers, max(cols) + 1, kernel, up2, inter, classes)


@dataclass
class LoadReport:
    checkpoint: str
    loaded: int = 0
    dropped: List[str] = field(default_factory=list)  # in the file, deliberately not loaded
    missing: List[str] = field(default_factory=list)  # in the model, left at their init

    def summary(self) -> str:
        s = f"loaded {self.loaded} tensors from {self.checkpoint}"
        if self.dropped:
            s += f"; dropped {len(self.dropped)} ({_prefixes(self.dropped)})"
        if self.missing:
            s += f"; {len(self.missing)} left at init ({_prefixes(self.missing)})"
        return s


def _prefixes(keys: List[str]) -> str:
    seen = []
    for k in keys:
        p = ".".join(k.split(".")[:2])
        if p not in seen:
            seen.append(p)
    return ", ".join(seen[:6]) + (", ..." if len(seen) > 6 else "")


def extract_state_dict(obj: Mapping, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    entry = "state_dict_ema" if use_ema else "model"
    if entry in obj and isinstance(obj[entry], Mapping):
        sd = obj[entry]
    elif use_ema:
        raise CheckpointError("the checkpoint has no 'state_dict_ema' entry; load without use_ema")
    else:
        sd = obj
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"entry {k!r} is a {type(v).__name__}, not a tensor: not a state_dict")
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def load_official_checkpoint(
    model: torch.nn.Module,
    path_or_state_dict: Union[str, os.PathLike, Mapping],
    strict: bool = True,
    use_ema: bool = False,
    only: Optional[Callable[[str], bool]] = None,
) -> LoadReport:
    """Load weights in the authors' released format (a .pth file or its state_dict).

    A checkpoint with another number of classes (22K into 1K) keeps the backbone and drops
    the heads and decoders; a checkpoint of another backbone fails naming what it looks like.
    ``only``: which of the model's (internal) keys this process loads (a pipeline stage its own;
    the file is memory-mapped, so the others are never read).
    """
    model = getattr(model, "module", model)
    cfg: RevColConfig = model.config
    if isinstance(path_or_state_dict, Mapping):
        src, obj = "<state_dict>", path_or_state_dict
    else:
        src, obj = os.fspath(path_or_state_dict), safe_load(path_or_state_dict)
    sd = extract_state_dict(obj, use_ema)
    info = inspect_state_dict(sd)
    if not info.same_backbone(cfg):
        mine = ArchInfo(tuple(cfg.channels), tuple(cfg.layers), cfg.num_columns, cfg.kernel_size,
                        cfg.level0_up2, cfg.inter_supv, cfg.num_classes)
        raise CheckpointError(
            f"{src} holds {info.describe()}, but the model is {mine.describe()}: "
            f"create the matching model (e.g. create_model('{info.describe().split()[0]}'))"
        )
    report = LoadReport(src)
    own = model.state_dict()
    n_heads = len(model.heads)
    mapped: Dict[str, torch.Tensor] = {}
    drop_heads = info.num_classes != cfg.num_classes
    for k, v in sd.items():
        is_head = k.startswith(("cls.", "cls_blocks.", "decoder_blocks."))
        if is_head and drop_heads:
            report.dropped.append(k)
            continue
        ik = _from_official_key(k, info, n_heads)
        if ik is None:
            report.dropped.append(k)
            continue
        if only is None or only(ik):
            mapped[ik] = v
    if only is not None:
        own = {k: v for k, v in own.items() if only(k)}
    for k, v in mapped.items():
        if k not in own:
            raise CheckpointError(f"{src}: key {k!r} has no place in {cfg.name}")
        if own[k].shape != v.shape:
            raise CheckpointError(
                f"{src}: {k} has shape {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the model"
            )
    report.missing = [k for k in own if k not in mapped]
    unexplained = [k for k in report.missing if not (drop_heads and k.startswith(("heads.", "decoders.")))]
    if strict and unexplained:
        raise CheckpointError(
            f"{src} lacks {len(unexplained)} tensors the model has ({_prefixes(unexplained)}); "
            f"pass strict=False to leave them at their initial values"
        )
    model.load_state_dict(mapped, strict=False)
    report.loaded = len(mapped)
    return report


def _from_official_key(key: str, info: ArchInfo, n_heads: int) -> Optional[str]:
    """Released key -> internal key; None for a head the model does not have."""
    key = _COLUMN_BACK[0].sub(_COLUMN_BACK[1], key)
    if key.startswith("cls."):
        return f"heads.{n_heads - 1}." + key[len("cls.") :]
    if key.startswith("cls_blocks."):
        idx, rest = key[len("cls_blocks.") :].split(".", 1)
        idx = int(idx)
        if n_heads == 1:  # deploy model: keep only the last (final) head
            return f"heads.0.{rest}" if _is_last_head(idx, info) else None
        return f"heads.{idx}.{rest}" if idx < n_heads else None
    if key.startswith("decoder_blocks."):
        return "decoders." + key[len("decoder_blocks.") :] if n_heads > 1 else None
    return key


def _is_last_head(idx: int, info: ArchInfo) -> bool:
    k = max(1, info.num_columns // 4)
    return idx == len([i for i in range(info.num_columns) if (i + 1) % k == 0]) - 1
