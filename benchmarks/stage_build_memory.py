"""Peak host memory of one pipeline rank while it builds its stage: on the meta device, then
only its own modules materialised (what PipelineEngine does), against building the whole model
and dropping the other stages' weights (what every rank did before). Each build runs in a fresh
process; its peak anonymous resident memory (RssAnon, sampled every 2 ms: not the pages of
torch's shared libraries, which a fresh install maps in differently) above its level after the
imports is what the build cost.

    python benchmarks/stage_build_memory.py --model revcol_large --stages 4
    python benchmarks/stage_build_memory.py --model revcol_huge --stages 4 --stage 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from resume_any_layout import PeakRSS  # noqa: E402  (RssAnon sampled on a thread)


def child(model_name: str, stages: int, stage: int, mode: str) -> dict:
    """Build in this process; returns the bytes the build added at its peak and the stage's share."""
    import torch

    from revcol_dist.models import create_model

    torch.set_num_threads(1)
    with torch.device("meta"):  # imports done, allocator warm: the baseline
        create_model(model_name)
    with PeakRSS() as peak:
        model = _build(model_name, stages, stage, mode)
    share = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"peak_added_bytes": max(peak.extra, 0), "stage_bytes": share,
            "total_params": sum(1 for _ in model.parameters())}


def _build(model_name: str, stages: int, stage: int, mode: str):
    import torch

    from revcol_dist.models import create_model
    from revcol_dist.models.init import initialize, materialize
    from revcol_dist.parallel.pipeline.partition import column_modules, split_columns

    if mode == "meta":
        with torch.device("meta"):
            model = create_model(model_name)
        groups, _ = split_columns(model, stages)
        mine = [m for c in groups[stage] for m in column_modules(model)[c]]
        materialize(model, mine, seed=0, device="cpu")
    else:  # the whole model, then the other stages' weights released
        model = create_model(model_name)
        initialize(model, 0)
        groups, _ = split_columns(model, stages)
        owned = {id(p) for c in groups[stage] for m in column_modules(model)[c] for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in owned:
                p.data = p.data.new_empty(0)
    return model


def measure(model_name: str, stages: int, stage: int, mode: str) -> dict:
    """``child`` in a fresh interpreter (peak RSS is per process)."""
    cmd = [sys.executable, __file__, "--child", "--model", model_name, "--stages", str(stages),
           "--stage", str(stage), "--mode", mode]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="revcol_large")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--stage", type=int, default=None, help="one stage (default: every stage)")
    ap.add_argument("--mode", choices=["meta", "whole"], default="meta")
    ap.add_argument("--skip-whole", action="store_true", help="no whole-model baseline (RevCol-H: 8.4 GB)")
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.model, a.stages, a.stage, a.mode)))
        return
    stages = range(a.stages) if a.stage is None else [a.stage]
    rows = []
    for s in stages:
        meta = measure(a.model, a.stages, s, "meta")
        row = {"stage": s, "stage_mib": meta["stage_bytes"] / 2**20, "meta_peak_mib": meta["peak_added_bytes"] / 2**20,
               "meta_over_share": meta["peak_added_bytes"] / max(meta["stage_bytes"], 1)}
        if not a.skip_whole:
            whole = measure(a.model, a.stages, s, "whole")
            row.update(whole_peak_mib=whole["peak_added_bytes"] / 2**20,
                       whole_over_meta=whole["peak_added_bytes"] / max(meta["peak_added_bytes"], 1))
        rows.append(row)
    worst = max(r["meta_over_share"] for r in rows)
    out = {"benchmark": "stage_build_memory", "model": a.model, "stages": a.stages, "per_stage": rows,
           "worst_meta_over_share": worst}
    if not a.skip_whole:
        out["whole_over_meta_min"] = min(r["whole_over_meta"] for r in rows)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
