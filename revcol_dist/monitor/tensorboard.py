"""TensorBoard as a user reads it. Every page TensorBoard opens on groups tags by their first path
component, groups in name order (Time Series and Scalars open the first two): so each tag sits in a
numbered group, how training goes first (``1_overview``: training loss, validation top-1, LR,
throughput), internal statistics last. The Custom Scalars tab holds one chart per scale. Written
by rank 0 only (other ranks hold a no-op)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

# The trainer's names for what it logs -> TensorBoard tags, in the order a person reads them.
TAGS = {
    "loss": "1_overview/1_train_loss", "val/top1": "1_overview/2_val_top1", "lr": "1_overview/3_lr",
    "images_per_sec": "1_overview/4_images_per_sec",
    "val/top5": "2_val/top5", "val/loss": "2_val/loss",
    "val_ema/top1": "2_val/top1_ema", "val_ema/top5": "2_val/top5_ema", "val_ema/loss": "2_val/loss_ema",
    # 3_loss_terms/cls_{i}, 3_loss_terms/rec_{i}: see tag()
    "images_per_sec_per_device": "5_speed/images_per_sec_per_device", "mfu": "5_speed/mfu",
    "data_wait_share": "5_speed/data_wait_share", "step_time": "5_speed/step_time",
    "grad_norm": "6_health/grad_norm", "drift": "6_health/drift", "alpha_min": "6_health/alpha_min",
    "mem_peak_bytes": "6_health/mem_peak_bytes",
}
RECONSTRUCTIONS = "4_reconstructions/input_then_decoders"
ALPHA = "7_alpha/level_{}"


def tag(name: str) -> str:
    """The TensorBoard tag of one of the trainer's names (``loss_cls_{i}``/``loss_rec_{i}``: the
    loss terms, together in their own group); an unknown name goes last, under ``other/``."""
    if name.startswith(("loss_cls_", "loss_rec_")):
        return "3_loss_terms/" + name[len("loss_"):]
    return TAGS.get(name, f"other/{name}")


def tagged(values: Dict[str, Optional[float]]) -> Dict[str, Optional[float]]:
    """``values`` under their TensorBoard tags."""
    return {tag(k): v for k, v in values.items()}


def _chart(*names: str) -> list:
    """A line chart of these names' tags. The plugin matches a pattern at a tag's start only, so
    each is anchored: ``2_val/loss`` must not also draw ``2_val/loss_ema``."""
    return ["Multiline", [re.escape(tag(n)) + "$" for n in names]]


def front_page(num_aux: int, mfu: bool = True) -> Dict[str, Dict[str, list]]:
    """The custom-scalars layout: what people look at first, in this order, one chart per scale
    (the total loss is several times any of its terms). ``mfu``: whether the peak it needs is
    known; without it the chart would stay empty, so it is left out."""
    training = {"loss": _chart("loss")}
    if num_aux:
        training["classification loss per head"] = _chart(*(f"loss_cls_{i}" for i in range(num_aux + 1)))
        training["reconstruction loss per decoder"] = _chart(*(f"loss_rec_{i}" for i in range(num_aux)))
    training["learning rate"] = _chart("lr")
    training["throughput (images/s)"] = _chart("images_per_sec")
    training["images/s per device"] = _chart("images_per_sec_per_device")
    if mfu:
        training["model FLOPs utilisation"] = _chart("mfu")
    training["share of time waiting for data"] = _chart("data_wait_share")
    validation = {"top-1 (%)": _chart("val/top1", "val_ema/top1"),
                  "top-5 (%)": _chart("val/top5", "val_ema/top5"),
                  "loss": _chart("val/loss", "val_ema/loss")}
    health = {"gradient norm": _chart("grad_norm"),
              "reconstruction drift": _chart("drift"),
              "smallest |alpha|": _chart("alpha_min"),
              "step time (s)": _chart("step_time"),
              "peak memory (bytes)": _chart("mem_peak_bytes")}
    return {"1. training": training, "2. validation": validation, "3. health": health}


def alpha_histograms(alphas: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """|alpha| of every column and channel, one histogram per level (``columns.C.alphaL``)."""
    levels: Dict[int, list] = {}
    for name, a in alphas.items():
        levels.setdefault(int(name.rsplit("alpha", 1)[1]), []).append(a.abs().reshape(-1))
    return {ALPHA.format(l): torch.cat(v) for l, v in sorted(levels.items())}


def reconstruction_grid(inputs: torch.Tensor, decoded: Sequence[torch.Tensor], rows: int = 4,
                        min_tile: int = 64) -> torch.Tensor:
    """[3, rows*h, (1+n)*w] in [0, 1]: each row a sample, its input then each decoder's image;
    tiles smaller than ``min_tile`` pixels are enlarged (nearest) so that small images stay legible."""
    n = min(rows, inputs.shape[0])
    cols = [inputs[:n]] + [d[:n] for d in decoded]
    grid = torch.cat([torch.cat(list(c.float().cpu()), dim=1) for c in cols], dim=2)  # [3, n*H, (1+k)*W]
    factor = -(-min_tile // min(inputs.shape[-2:]))
    if factor > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=factor, mode="nearest")[0]
    return grid.clamp(0, 1)


class Board:
    def __init__(self, log_dir: Optional[Path], enabled: bool = True) -> None:
        self.writer = None
        self.log_dir = log_dir
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=30)

    def layout(self, layout: Dict[str, Dict[str, list]]) -> None:
        if self.writer is not None:
            self.writer.add_custom_scalars(layout)

    def add(self, values: Dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            if v is not None:
                self.writer.add_scalar(tag, float(v), step)

    def histograms(self, values: Dict[str, torch.Tensor], step: int) -> None:
        if self.writer is not None:
            for tag, v in values.items():
                self.writer.add_histogram(tag, v, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
