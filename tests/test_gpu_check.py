"""benchmarks/gpu_check.py in its CPU mode: the script run on a lent GPU must not rot between
loans, so every check it makes runs here at tiny sizes and must pass."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKS = {"local_step", "process_groups", "reversible_gradients", "offload", "memory_vs_planner", "throughput",
          "data_finish", "cuda_graph", "compile_combo", "late_read"}

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--mode", "cpu", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout[-3000:]
    data = json.loads(lines[0])
    assert data == json.loads(out.read_text())
    return data


def test_every_check_ran_and_passed(report):
    assert report["ok"] is True and report["mode"] == "cpu"
    assert set(report["checks"]) == CHECKS
    failed = {k: v for k, v in report["checks"].items() if v["ok"] is not True}
    assert not failed, failed
    assert report["checks"]["memory_vs_planner"]["skipped"] is True  # needs CUDA memory statistics
    assert report["checks"]["cuda_graph"]["skipped"] is True  # needs CUDA
    assert report["checks"]["late_read"]["skipped"] is True
    assert report["checks"]["compile_combo"]["skipped"] is True  # on a CPU inductor combines nothing
    env = report["env"]
    assert env["torch"] and env["deepspeed"] and env["gpus"] == 0 and report["wall_s"] > 0


def test_reversible_gradients_match_plain_autograd(report):
    c = report["checks"]["reversible_gradients"]
    assert c["fp32"]["rev_vs_plain"] < 1e-4
    assert c["fp32"]["loss_plain"] == c["fp32"]["loss_rev"]  # the forward is the same computation
    assert c["bf16"]["ok"]


def test_process_groups_follow_the_single_process_run(report):
    c = report["checks"]["process_groups"]
    assert set(c["modes"]) == {"single", "ddp", "zero1", "zero2", "zero3", "zero3_offload"}
    assert c["worst_rel_loss_diff"] < 1e-5
    assert [c["modes"][m]["backend"] for m in ("zero1", "zero2", "zero3", "zero3_offload")] == \
        ["zero1", "zero2", "zero3", "zero3"]


def test_data_finish_on_the_device_equals_the_cpu(report):
    c = report["checks"]["data_finish"]
    assert c["max_abs_diff"] == 0.0 and 0 < c["erased"] < c["batch"]


def test_offload_and_throughput_measured(report):
    off = report["checks"]["offload"]
    assert off["bytes_offloaded"] > 0 and off["worst_rel_diff"] <= 1e-6
    t = report["checks"]["throughput"]["revcol_mini"]
    assert t["reversible"]["images_per_sec"] > 0 and t["plain"]["images_per_sec"] > 0
    assert t["reversible_over_plain"] > 0 and t["forward_gmacs"] > 0
    assert t["reversible"]["mfu"] is None  # no peak known for a CPU
