"""The per-kernel table at a tiny size on the CPU, so that its accounting keeps working (its numbers
mean something only on a GPU: benchmarks/kernel_table.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.launches
def test_kernel_table_prints_its_line():
    # two narrow columns: the profiler's parsing of a whole RevCol-T step took 2 minutes here
    args = '{"num_columns": 2, "channels": [16, 32, 48, 64], "layers": [1, 1, 2, 1]}'
    env = {**os.environ, "BENCH_MODEL": "revcol_tiny", "BENCH_BATCH": "2", "BENCH_RES": "32", "BENCH_ROWS": "100000",
           "BENCH_MODEL_ARGS": args}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_table.py")], capture_output=True, text=True,
                       timeout=600, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "kernel_table" and out["timing"] == "cpu" and out["model"] == "revcol_tiny"
    assert out["model_args"] == json.loads(args)
    assert out["ops_per_step"] > 0 and out["busy_ms"] > 0
    rows = out["rows"]
    assert rows and [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
    assert all(r["bytes"] > 0 for r in rows)
    matmuls = [r for r in rows if r["op"] in ("mm", "addmm")]
    assert matmuls and all(r["flops"] > 0 for r in rows if r["matmul"])
    assert all(r["flops"] == 0 for r in rows if not r["matmul"])
    timed = [r for r in rows if r["ms"] >= 0.01]
    assert timed
    for row in timed:  # achieved bandwidth and throughput are the row's own bytes and FLOPs over its time
        assert row["gbs"] == pytest.approx(row["bytes"] / (row["ms"] / 1e3) / 1e9, rel=1e-3)
        assert row["tflops"] == pytest.approx(row["flops"] / (row["ms"] / 1e3) / 1e12, rel=1e-3, abs=1e-12)
    # a linear layer's matmul (tokens x C_in) @ (C_in x C_out), charged its inputs and its output
    mm = next(r for r in rows if r["op"] == "addmm" and r["dtypes"] == "bf16,bf16,bf16")
    (c_out,), (m, k), (k2, n) = [tuple(int(d) for d in s.strip("()").split("x")) for s in mm["shapes"].split(", ")]
    assert k == k2 and n == c_out
    per_call = 2 * (n + m * k + k * n + m * n)
    assert mm["bytes"] == pytest.approx(per_call * mm["calls"])
    assert mm["flops"] == pytest.approx(2 * m * k * n * mm["calls"])
    # the whole table: every op with a size is there, and the step's roofline is below its busy time
    assert sum(r["ideal_ms"] for r in rows) == pytest.approx(out["ideal_ms"], rel=1e-3, abs=1e-4)
    assert 0 < out["ideal_ms"] <= out["busy_ms"] and out["ideal_vs_busy"] <= 1
    assert 0 < out["matmul_share"] < 1 and 0 < out["memory_bound_share"] <= 1
