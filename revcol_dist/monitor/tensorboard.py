"""TensorBoard as a user reads it: a front page (custom scalars) with the loss per head,
validation top-1/top-5, LR and throughput first; alphas per level as histograms;
reconstructions beside their input images. Written by rank 0 only (other ranks hold a no-op)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import torch


def front_page(num_aux: int) -> Dict[str, Dict[str, list]]:
    """The custom-scalars layout: what people look at first, in this order."""
    training = {"loss": ["Multiline", ["train/loss"]]}
    if num_aux:
        training["classification loss per head"] = ["Multiline", [f"train/loss_cls_{i}" for i in range(num_aux + 1)]]
        training["reconstruction loss per decoder"] = ["Multiline", [f"train/loss_rec_{i}" for i in range(num_aux)]]
    training["learning rate"] = ["Multiline", ["train/lr"]]
    training["throughput (images/s)"] = ["Multiline", ["train/images_per_sec"]]
    training["images/s per device"] = ["Multiline", ["train/images_per_sec_per_device"]]
    training["model FLOPs utilisation"] = ["Multiline", ["train/mfu"]]
    training["share of time waiting for data"] = ["Multiline", ["train/data_wait_share"]]
    validation = {"top-1 (%)": ["Multiline", ["val/top1", "val_ema/top1"]],
                  "top-5 (%)": ["Multiline", ["val/top5", "val_ema/top5"]],
                  "loss": ["Multiline", ["val/loss", "val_ema/loss"]]}
    health = {"gradient norm": ["Multiline", ["train/grad_norm"]],
              "reconstruction drift": ["Multiline", ["rev/drift"]],
              "smallest |alpha|": ["Multiline", ["rev/alpha_min"]],
              "step time (s)": ["Multiline", ["train/step_time"]],
              "peak memory (bytes)": ["Multiline", ["sys/mem_peak_bytes"]]}
    return {"1. training": training, "2. validation": validation, "3. health": health}


def alpha_histograms(alphas: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """|alpha| of every column and channel, one histogram per level (``columns.C.alphaL``)."""
    levels: Dict[int, list] = {}
    for name, a in alphas.items():
        levels.setdefault(int(name.rsplit("alpha", 1)[1]), []).append(a.abs().reshape(-1))
    return {f"alpha/level_{l}": torch.cat(v) for l, v in sorted(levels.items())}


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
