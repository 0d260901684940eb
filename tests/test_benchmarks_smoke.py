"""The data-loading benchmark at a tiny size, so that it keeps running (its targets are judged
at full size: docs/benchmarks.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from revcol_dist.data.ffcv_support import ffcv_available

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.launches
@pytest.mark.skipif(not ffcv_available(), reason="the ffcv extra is not installed")
def test_data_loader_benchmark_prints_its_line():
    pytest.importorskip("skimage")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_loader_throughput.py"), "--images", "48",
                        "--batch", "8", "--size", "48", "--epochs", "1", "--workers", "1"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ("recipe", "crop_flip", "pil_dataloader"):
        assert out[k]["images_per_sec"] > 0 and 0 <= out[k]["thread_fraction"] <= 1
    assert out["recipe_over_pil"] > 0 and isinstance(out["targets_met"], bool)
