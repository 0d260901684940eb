"""Live throughput, model FLOPs utilisation and the share of time spent waiting for data.

MFU = images/s per device x model FLOPs per training image / the device's peak. Model FLOPs
are the analytic 6 x forward MACs (``models/flops.py``; the reversible recomputation is not
counted). The peak is the dense tensor-core rate of the precision the run computes in: bf16
and fp16 at the bf16 rate, fp32 at the TF32 rate when TF32 is on, else plain fp32."""

from __future__ import annotations

import time
from typing import Dict, Optional

import torch

# Dense peak TFLOPS by device name (SXM parts; PCIe parts run lower): bf16, tf32, fp32.
PEAK_TFLOPS = {  # the first name found in torch.cuda.get_device_name() wins: PCIe parts first
    "H100 PCIe": (756.0, 378.0, 51.0),
    "H200": (989.0, 494.0, 67.0),
    "H100": (989.0, 494.0, 67.0),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.0, 183.0, 91.6),
    "A10": (125.0, 62.5, 31.2),
    "V100": (125.0, None, 15.7),  # fp16 tensor cores; no TF32
}


def peak_tflops(device: torch.device, precision: str, tf32: bool, override: Optional[float] = None) -> Optional[float]:
    """The device's peak for this run (``override``: monitor.peak_tflops); None where unknown
    (CPUs, GPUs not in the table): MFU is then not reported."""
    if override:
        return float(override)
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32_rate, fp32) in PEAK_TFLOPS.items():
        if key in name:
            if precision in ("bf16", "fp16"):
                return bf16
            return tf32_rate if tf32 and tf32_rate else fp32
    return None


def missing_peak(device: torch.device) -> str:
    """Why MFU is not reported (the peak it divides by is unknown), and the setting that gives it."""
    device = torch.device(device)
    what = f"GPU {torch.cuda.get_device_name(device)!r}" if device.type == "cuda" else f"{device.type.upper()} devices"
    return (f"MFU not reported: no peak FLOPS known for {what} (table in monitor/throughput.py); "
            f"set monitor.peak_tflops=<the device's dense peak TFLOPS> to report it")


class Throughput:
    """Counts a logging window: images, seconds, and seconds spent waiting for the next batch."""

    def __init__(self, flops_per_image: float, devices: int, peak: Optional[float]) -> None:
        self.flops_per_image, self.devices, self.peak = flops_per_image, devices, peak
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.steps, self.data_wait_s = time.perf_counter(), 0, 0, 0.0

    def waited(self, seconds: float) -> None:
        self.data_wait_s += seconds

    def stepped(self, images: int) -> None:
        self.images += images
        self.steps += 1

    def window(self) -> Dict[str, Optional[float]]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        ips = self.images / elapsed
        per_device = ips / self.devices
        mfu = per_device * self.flops_per_image / (self.peak * 1e12) if self.peak else None
        return {"images_per_sec": ips, "images_per_sec_per_device": per_device, "mfu": mfu,
                "data_wait_share": min(self.data_wait_s / elapsed, 1.0),
                "step_time": elapsed / max(self.steps, 1)}
