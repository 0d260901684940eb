"""Peak live tensor bytes of one training step: reversible (each k) vs plain vs published.

python benchmarks/reversible_memory.py          (one JSON line on stdout)
BENCH_MODELS=revcol_base,revcol_large BENCH_MODES=published,rev_default,rev_k2_keep3 ...  (others)
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
    models = os.environ.get("BENCH_MODELS", "revcol_tiny,revcol_small").split(",")
    modes = os.environ.get("BENCH_MODES", ",".join(MODES)).split(",")
    for name in models:
        for inter in (False, True):
            torch.manual_seed(0)
            x = torch.randn(batch, 3, res, res)
            labels = torch.randint(0, 1000, (batch,))
            row = {}
            for mode in modes:
                m = build(name, mode, inter)
                peak_step_bytes(m, x, labels)  # warm-up (allocator, lazy init)
                row[mode] = peak_step_bytes(m, x, labels)["peak_bytes"]
                del m
            key = f"{name}{'_inter' if inter else ''}"
            for mode in modes:
                if "published" in row and mode != "published":
                    row[f"{mode}_over_published"] = row[mode] / row["published"]
            if {"rev_kN_block", "plain", "plain_heads_recomputed"} <= row.keys():
                row["plain_over_rev_kN_block"] = row["plain"] / row["rev_kN_block"]
                row["plain_heads_recomputed_over_rev_kN_block"] = row["plain_heads_recomputed"] / row["rev_kN_block"]
            results[key] = row
    summary = {"benchmark": "reversible_memory", "batch": batch, "resolution": res, "unit": "bytes",
               "results": results}
    if {"revcol_tiny", "revcol_small"} <= set(models) and "rev_kN" in modes:
        for sfx in ("", "_inter"):
            summary[f"small_over_tiny_kN{sfx}"] = (results[f"revcol_small{sfx}"]["rev_kN"]
                                                   / results[f"revcol_tiny{sfx}"]["rev_kN"])
            if sfx and "plain_over_rev_kN_block" in results["revcol_tiny_inter"]:
                for name in ("tiny", "small"):
                    summary[f"inter_plain_over_kN_block_{name}"] = results[f"revcol_{name}_inter"]["plain_over_rev_kN_block"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
