"""Training-step time: reversible vs plain vs the published per-column approach.

python benchmarks/reversible_step_time.py       (one JSON line on stdout)
RevCol-T, batch 4, 96x96, one thread, modes interleaved in one process, median of 9; also
each mode's peak live tensor bytes of one step at that setting (against published's).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import build, peak_step_bytes, step  # noqa: E402

MODES = ("plain", "published", "rev_default", "rev_kN_default", "rev_k2", "rev_k2_autograd_blocks", "rev_kN",
         "rev_kN_lean", "rev_kN_lean_keep3", "rev_k2_keep23", "rev_k2_fast", "rev_k2_fast_keep23", "rev_kN_block")


def main() -> None:
    torch.set_num_threads(1)
    repeats = int(os.environ.get("BENCH_REPEATS", "9"))
    torch.manual_seed(0)
    x = torch.randn(4, 3, 96, 96)
    labels = torch.randint(0, 1000, (4,))
    models = {mode: build("revcol_tiny", mode, inter_supv=False) for mode in MODES}
    times = {mode: [] for mode in MODES}
    for m in models.values():  # warm-up
        step(m, x, labels)
    for _ in range(repeats):
        for mode, m in models.items():
            m.zero_grad(set_to_none=True)
            t = time.perf_counter()
            step(m, x, labels)
            times[mode].append(time.perf_counter() - t)
    med = {mode: statistics.median(v) for mode, v in times.items()}
    peak = {mode: peak_step_bytes(m, x, labels)["peak_bytes"] for mode, m in models.items()}
    print(json.dumps({
        "benchmark": "reversible_step_time",
        "model": "revcol_tiny", "batch": 4, "resolution": 96, "threads": 1, "repeats": repeats,
        "median_s": med,
        "over_plain": {mode: med[mode] / med["plain"] for mode in MODES},
        "over_published": {mode: med[mode] / med["published"] for mode in MODES},
        "peak_bytes": peak,
        "memory_over_published": {mode: peak[mode] / peak["published"] for mode in MODES},
    }))


if __name__ == "__main__":
    main()
