"""Converting a native-only ZeRO-3 checkpoint to the layout-free form without holding it whole:
each rank's peak host memory while converting, against the checkpoint's size, and against
resuming the same checkpoint on its own layout (what the run itself needed).

    python benchmarks/convert_checkpoint_memory.py        (RevCol-L, ZeRO-3 x 2 gloo ranks)

1. The main job's config with RevCol-L trains one step under ZeRO-3 on 2 ranks and writes a
   native-only checkpoint (train.portable_checkpoint=false; EMA on).
2. In fresh processes on the same layout: the Trainer is built, then (a) the native resume
   alone, (b) the conversion (``Trainer.convert``: the native resume, then the layout-free form
   written in place). Peak memory is each rank's anonymous resident memory (RssAnon, not the
   page cache) above its level once the Trainer is built, sampled every 2 ms.
One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(29600 + os.getpid() % 300), *args],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return r


def child(config: str, ds: str, checkpoint: str, mode: str, out: str) -> None:
    from resume_any_layout import PeakRSS

    from revcol_dist.config import load_config
    from revcol_dist.engine.train import Trainer
    from revcol_dist.parallel import comm

    trainer = Trainer(load_config(config, ["monitor.tensorboard=false"]), ds)
    comm.barrier()
    with PeakRSS() as peak:
        if mode == "resume":
            trainer._resume_native(Path(checkpoint))
        else:
            trainer.convert(Path(checkpoint))
    comm.barrier()
    peaks = comm.all_gather_object({"extra": peak.extra, "seconds": peak.seconds})
    if comm.rank() == 0:
        Path(out).write_text(json.dumps(peaks))


def _bytes(folder: Path, skip: str = "") -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not (skip and skip in f.parts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="revcol_large")
    ap.add_argument("--child", nargs=5, metavar=("CONFIG", "DS", "CHECKPOINT", "MODE", "OUT"))
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    work = Path(tempfile.mkdtemp(prefix="convert_bench_"))
    try:
        ds = str(REPO / "ds_configs" / "zero3.json")
        out_dir = work / "run"
        _torchrun("launchers/pretrain.py", "--deepspeed_config", ds, "--set", f"model.name={a.model}",
                  "--set", f"output_dir={out_dir}", "--set", f"data.root={work / 'digits'}", "--set", "train.max_steps=1",
                  "--set", "train.batch_size=4", "--set", "train.portable_checkpoint=false",
                  "--set", "train.ema_decay=0.999", "--set", "monitor.tensorboard=false")
        checkpoint = sorted((out_dir / "checkpoints").glob("step_*"))[-1]
        native = _bytes(checkpoint)
        rows = {}
        for mode in ("resume", "convert"):
            result = work / f"{mode}.json"
            _torchrun(__file__, "--child", str(out_dir / "config.yaml"), ds, str(checkpoint), mode, str(result))
            rows[mode] = json.loads(result.read_text())
        portable = _bytes(checkpoint / "portable")
        worst = max(r["extra"] for r in rows["convert"])
        print(json.dumps({
            "benchmark": "convert_checkpoint_memory", "model": a.model, "layout": "zero3 x 2",
            "native_checkpoint_mib": round(native / 2**20), "portable_form_mib": round(portable / 2**20),
            "convert_peak_mib_per_rank": [round(r["extra"] / 2**20) for r in rows["convert"]],
            "resume_peak_mib_per_rank": [round(r["extra"] / 2**20) for r in rows["resume"]],
            "convert_s": round(max(r["seconds"] for r in rows["convert"]), 1),
            "convert_peak_over_portable": round(worst / portable, 3),
            "convert_peak_over_resume_peak": round(worst / max(r["extra"] for r in rows["resume"]), 3),
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
