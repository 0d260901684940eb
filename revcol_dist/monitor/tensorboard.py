"""TensorBoard scalars under stable tags, written by rank 0 only (other ranks hold a no-op)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional


class Scalars:
    def __init__(self, log_dir: Optional[Path], enabled: bool = True) -> None:
        self.writer = None
        self.log_dir = log_dir
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=30)

    def add(self, values: Dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            if v is not None:
                self.writer.add_scalar(tag, float(v), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
