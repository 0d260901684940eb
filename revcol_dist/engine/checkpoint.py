"""Checkpoint files written so that a crash mid-write never destroys the previous one."""

from __future__ import annotations

import json as _json
import os
import random as _random
import shutil as _shutil
from pathlib import Path
from typing import Any

import numpy as _np
import torch

from ..files import atomic_save, fsync_dir


# ----------------------------------------------------------------- resumable checkpoints


def rng_state() -> dict:
    """This rank's random generators (drop path, augmentation, python/numpy users)."""
    np_state = _np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(_np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": _random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    _np.random.set_state(("MT19937", n["keys"].numpy().astype(_np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    _random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """``root/step_XXXXXXXX/`` folders, each complete or absent.

    Every rank writes into ``root/.tmp_step_XXXXXXXX/``; once all have finished, rank 0 adds
    ``complete.json`` and renames the folder. A crash mid-write leaves only a ``.tmp_*`` folder,
    which is ignored (and removed by the next save); the previous checkpoint stays usable.
    """

    def __init__(self, root: Path, rank: int, world_size: int, keep: int = 2) -> None:
        self.root, self.rank, self.world_size, self.keep = Path(root), rank, world_size, max(1, keep)

    def complete(self):
        if not self.root.is_dir():
            return []
        return sorted(d for d in self.root.glob("step_*") if (d / "complete.json").is_file())

    def latest(self):
        done = self.complete()
        return done[-1] if done else None

    def save(self, backend, step: int, client_state: dict, meta: dict) -> Path:
        from ..parallel.comm import barrier

        tmp = self.root / f".tmp_step_{step:08d}"
        final = self.root / f"step_{step:08d}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp_step_*"):
                _shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        barrier()
        backend.save(tmp)
        atomic_save(client_state, tmp / f"client_rank{self.rank:05d}.pt")
        barrier()
        if self.rank == 0:
            (tmp / "complete.json").write_text(_json.dumps({**meta, "step": step, "world_size": self.world_size}))
            if final.exists():
                _shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            for old in self.complete()[: -self.keep]:
                _shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def read_meta(self, directory: Path) -> dict:
        marker = Path(directory) / "complete.json"
        if not marker.is_file():
            raise FileNotFoundError(f"{directory} is not a complete checkpoint (no complete.json)")
        return _json.loads(marker.read_text())

    def load_client(self, directory: Path) -> dict:
        path = Path(directory) / f"client_rank{self.rank:05d}.pt"
        return torch.load(path, map_location="cpu", weights_only=True)
