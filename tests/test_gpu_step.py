"""benchmarks/gpu_step.py in its CPU mode (tiny sizes): one JSON line per row, the baseline in
the same run, and the ratios; the plain step dispatches fewer ops than the reversible one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.launches
def test_gpu_step_cpu_mode_prints_its_rows():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--mode", "cpu", "--steps", "1",
                        "--alone"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    revcol = {x["memory_policy"]: x for x in rows if x.get("kind") == "revcol"}
    base = [x for x in rows if x.get("kind") == "baseline"]
    assert set(revcol) == {"reversible", "plain", "auto"} and len(base) == 1
    assert revcol["auto"]["ran"] == "reversible" and "CPU" in revcol["auto"]["reason"]
    assert revcol["plain"]["kernels_per_step"] < revcol["reversible"]["kernels_per_step"]  # no recomputation
    assert all(x["images_per_sec"] > 0 and x["kernels_per_step"] > 0 for x in rows[:-1])
    # the model alone (same heads; no drop path, layer decay, clipping, finite check, EMA) beside each
    alone = {x["memory_policy"]: x for x in rows if x.get("kind") == "alone"}
    assert set(alone) == {"reversible", "plain"}  # auto ran reversible: its row compares with reversible alone
    for policy, a in alone.items():
        assert a["trainer_kernels_over_alone"] == pytest.approx(revcol[policy]["kernels_per_step"] / a["kernels_per_step"])
        assert 1.0 < a["trainer_kernels_over_alone"] < 1.5  # the trainer's extras cost something, not a second model
    ratios = rows[-1]["ratios"]
    # printed to 4 decimals: a ratio near 0.016 is off by up to 5e-5 (3e-3 of it) from rounding alone
    assert ratios["revcol_tiny:plain"] == pytest.approx(revcol["plain"]["images_per_sec"] / base[0]["images_per_sec"],
                                                        rel=1e-3, abs=5.1e-5)
