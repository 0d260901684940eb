"""Peak live tensor bytes of one training step: reversible (each k) vs plain vs published.

python benchmarks/reversible_memory.py          (one JSON line on stdout)
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import MODES, build, peak_step_bytes  # noqa: E402


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    batch, res = 2, 128
    results = {}
    for name in ("revcol_tiny", "revcol_small"):
        for inter in (False, True):
            torch.manual_seed(0)
            x = torch.randn(batch, 3, res, res)
            labels = torch.randint(0, 1000, (batch,))
            row = {}
            for mode in MODES:
                m = build(name, mode, inter)
                peak_step_bytes(m, x, labels)  # warm-up (allocator, lazy init)
                row[mode] = peak_step_bytes(m, x, labels)["peak_bytes"]
                del m
            key = f"{name}{'_inter' if inter else ''}"
            row["plain_over_rev_kN_block"] = row["plain"] / row["rev_kN_block"]
            row["plain_heads_recomputed_over_rev_kN_block"] = row["plain_heads_recomputed"] / row["rev_kN_block"]
            for mode in ("rev_default", "rev_kN_default", "rev_k2"):
                row[f"{mode}_over_published"] = row[mode] / row["published"]
            results[key] = row
    summary = {
        "benchmark": "reversible_memory",
        "batch": batch,
        "resolution": res,
        "unit": "bytes",
        "results": results,
        "small_over_tiny_kN": results["revcol_small"]["rev_kN"] / results["revcol_tiny"]["rev_kN"],
        "small_over_tiny_kN_inter": results["revcol_small_inter"]["rev_kN"] / results["revcol_tiny_inter"]["rev_kN"],
        "inter_plain_over_kN_block_tiny": results["revcol_tiny_inter"]["plain_over_rev_kN_block"],
        "inter_plain_over_kN_block_small": results["revcol_small_inter"]["plain_over_rev_kN_block"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
