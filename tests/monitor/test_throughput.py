"""Throughput, MFU and data-wait share as the trainer logs them, and the GPU settings' rules."""

import time

import pytest
import torch

from revcol_dist.engine.optim import wants_cpu_adam
from revcol_dist.models import get_variant
from revcol_dist.models.flops import forward_macs, train_flops_per_image
from revcol_dist.monitor.throughput import Throughput, peak_tflops


def test_window_rates_and_mfu():
    # the window lasts at least the sleep and at most what the test measures around it (a loaded
    # machine, or the suite's idle priority, can wake the test late: bounds, not a tolerance)
    outer = time.perf_counter()
    tp = Throughput(flops_per_image=2e12, devices=4, peak=100.0)
    tp.waited(0.05)
    time.sleep(0.2)
    for _ in range(4):
        tp.stepped(64)
    w = tp.window()
    longest = time.perf_counter() - outer
    assert 256 / longest <= w["images_per_sec"] <= 256 / 0.2
    assert w["images_per_sec_per_device"] == pytest.approx(w["images_per_sec"] / 4)
    # MFU by hand: per-device images/s x FLOPs per image / peak FLOPS
    assert w["mfu"] == pytest.approx(w["images_per_sec_per_device"] * 2e12 / 100e12)
    assert 0.05 / longest <= w["data_wait_share"] <= 0.05 / 0.2
    assert 0.2 / 4 <= w["step_time"] <= longest / 4
    # the rates are of one window: images and wait over the same elapsed time
    assert w["data_wait_share"] == pytest.approx(0.05 * w["images_per_sec"] / 256)
    tp.reset()
    assert tp.images == 0 and tp.data_wait_s == 0.0
    assert Throughput(1.0, 1, None).window()["mfu"] is None  # unknown peak: no MFU rather than a guess


def test_peak_table_and_override():
    assert peak_tflops(torch.device("cpu"), "bf16", True) is None
    assert peak_tflops(torch.device("cpu"), "fp32", True, override=12.5) == 12.5


def test_model_flops_are_three_forwards():
    cfg = get_variant("revcol_tiny")
    assert train_flops_per_image(cfg, 224) == 6 * forward_macs(cfg, 224)
    assert forward_macs(cfg, 224) / 1e9 == pytest.approx(4.5, rel=0.02)  # the published 4.5 GFLOPs


def test_cpu_adam_only_for_offloaded_adamw_on_gpus():
    off = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    nvme = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert wants_cpu_adam("adamw", off, gpu) and wants_cpu_adam("adamw", nvme, gpu)
    assert not wants_cpu_adam("adamw", off, cpu)  # CPU runs and CI: torch's AdamW, nothing compiled
    assert not wants_cpu_adam("sgd", off, gpu)
    assert not wants_cpu_adam("adamw", {"zero_optimization": {"stage": 2}}, gpu)
    assert not wants_cpu_adam("adamw", None, gpu)
