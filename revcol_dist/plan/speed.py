"""Where the planner's throughput comes from: a measured row of the same GPU and model
(``measured_throughput.json``, written from benchmarks/gpu_step.py), else an assumed MFU.

A measured row gives an MFU against the planner's own FLOPs count, so a plan for another batch,
world size or pipeline keeps the measured efficiency; the plan says which basis it used."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

TABLE = Path(__file__).with_name("measured_throughput.json")
ASSUMED_MFU = 0.35


@dataclass(frozen=True)
class Basis:
    kind: str  # "measured" | "assumed" | "given"
    mfu: float
    note: str  # one line for the plan's reader


def measured_rows(path: Path = TABLE) -> List[dict]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def find_row(gpu: Optional[str], model: str, precision: str, res: int, rows: List[dict]) -> Optional[dict]:
    """The row of this GPU and model at this precision, the resolution nearest ``res`` first."""
    if not gpu:
        return None
    same = [r for r in rows if r["gpu"].lower() == gpu.lower() and r["model"] == model and r["precision"] == precision]
    return min(same, key=lambda r: abs(r["res"] - res)) if same else None


def basis(gpu: Optional[str], model: str, precision: str, res: int, mfu: Optional[float],
          peak_tflops: float, flops_per_image, rows: Optional[List[dict]] = None) -> Basis:
    """``flops_per_image(res, reversible)``: the planner's training FLOPs of one image."""
    if mfu is not None:
        return Basis("given", mfu, f"MFU {mfu:.1%} as given (--mfu)")
    row = find_row(gpu, model, precision, res, measured_rows() if rows is None else rows)
    if row is None:
        where = f"{model} on {gpu}" if gpu else f"{model} (no --gpu given)"
        return Basis("assumed", ASSUMED_MFU, f"MFU {ASSUMED_MFU:.0%} ASSUMED: no measurement of {where} in "
                                             f"{TABLE.name}; run benchmarks/gpu_step.py there")
    achieved = row["images_per_sec"] * flops_per_image(row["res"], row["reversible"]) / (peak_tflops * 1e12)
    return Basis("measured", achieved, f"MFU {achieved:.1%} measured: {row['images_per_sec']:g} img/s, {model} "
                                       f"batch {row['batch']} at {row['res']}px on one {row['gpu']} "
                                       f"({row['date']}, {row['source']})")
