"""Time and peak memory to save a checkpoint's layout-free form and to resume from it (what any
other layout reads), against the native checkpoint saved and resumed on the same layout, for
RevCol-S and RevCol-L.

python benchmarks/resume_any_layout.py          (one JSON line on stdout; BENCH_MODELS to change)

One process, the Trainer's pieces: LocalBackend with AdamW after one step (so the moments
exist), an EMA. Native: the backend's own save/load (torch.save of weights and optimizer) and
the EMA's state. Portable: ``write_portable`` / ``load_portable``, safetensors shards. Each
resume runs in a fresh process. Peak memory is the process's anonymous resident memory
(RssAnon: not the page cache of files it maps) above its level before the phase, sampled every
2 ms; the model, optimizer and EMA themselves are live in this one process (on N ranks each
reads only its share).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from revcol_dist.engine.ema import ModelEMA  # noqa: E402
from revcol_dist.engine.losses import RevColLoss  # noqa: E402
from revcol_dist.engine.optim import make_optimizer  # noqa: E402
from revcol_dist.engine.portable_checkpoint import load_portable, write_portable  # noqa: E402
from revcol_dist.models import create_model  # noqa: E402
from revcol_dist.parallel.backends import LocalBackend  # noqa: E402
from revcol_dist.parallel.distributed import DistInfo  # noqa: E402


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak resident bytes above the level at entry, sampled on a thread."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.extra = self.peak - self.base


def _backend(name: str):
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000)
    backend = LocalBackend(model, DistInfo(0, 1, 0), lambda m: make_optimizer(m, "adamw", 0.05), torch.device("cpu"))
    return backend, ModelEMA(backend.model, 0.999)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save(name: str, root: Path) -> dict:
    backend, ema = _backend(name)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 1000, (2,))
    backend.forward_backward([(x, y)], RevColLoss((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    backend.step(1e-4)
    ema.update()
    native, portable = root / "native", root / "portable"
    native.mkdir()
    with PeakRSS() as save_native:
        backend.save(native)
        torch.save(ema.state_dict(), native / "ema.pt")
    with PeakRSS() as save_portable:
        write_portable(portable, backend, ema, {"step": 1})
    return {"params": sum(p.numel() for p in backend.model.parameters()), "native_bytes": _folder_bytes(native),
            "portable_bytes": _folder_bytes(portable), "save_native": [save_native.seconds, save_native.extra],
            "save_portable": [save_portable.seconds, save_portable.extra]}


def resume(name: str, root: Path, form: str) -> dict:
    backend, ema = _backend(name)
    with PeakRSS() as m:
        if form == "native":
            backend.load(root / "native")
            ema.load_state_dict(torch.load(root / "native" / "ema.pt", weights_only=True))
        else:
            load_portable(root / "portable", backend, ema)
    return {f"resume_{form}": [m.seconds, m.extra]}


def _phase(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(name: str, root: Path) -> dict:
    out = _phase("--phase", "save", name, str(root))
    for form in ("native", "portable"):
        out.update(_phase("--phase", "resume", name, str(root), form))
    result = {k: out[k] for k in ("params", "native_bytes", "portable_bytes")}
    for tag in ("save_native", "save_portable", "resume_native", "resume_portable"):
        result[f"{tag}_s"], result[f"{tag}_peak_extra_bytes"] = round(out[tag][0], 3), out[tag][1]
    result["save_time_ratio"] = round(out["save_portable"][0] / out["save_native"][0], 3)
    result["resume_time_ratio"] = round(out["resume_portable"][0] / out["resume_native"][0], 3)
    result["resume_peak_ratio"] = round(out["resume_portable"][1] / max(out["resume_native"][1], 1), 3)
    result["portable_resume_peak_over_checkpoint"] = round(out["resume_portable"][1] / result["portable_bytes"], 3)
    return result


def main() -> None:
    if sys.argv[1:2] == ["--phase"]:
        phase, name, root = sys.argv[2], sys.argv[3], Path(sys.argv[4])
        out = save(name, root) if phase == "save" else resume(name, root, sys.argv[5])
        print(json.dumps(out))
        return
    models = os.environ.get("BENCH_MODELS", "revcol_small,revcol_large").split(",")
    result = {"benchmark": "resume_any_layout", "baseline": "the native checkpoint on the same layout"}
    for name in models:
        root = Path(tempfile.mkdtemp(prefix="resume_any_layout_"))
        try:
            result[name] = run(name, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"{name}: {result[name]}", file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
