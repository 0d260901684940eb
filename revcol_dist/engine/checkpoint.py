"""Resumable checkpoints that a crash, a full disk or bit rot cannot turn into a lost run.

``root/step_XXXXXXXX/`` folders, each complete or absent, each verifiable: every rank writes
into ``root/.tmp_step_XXXXXXXX/`` and records the size and CRC-32 of each file while writing it
(``files.recording``: no second read); once all have finished, rank 0 writes ``complete.json``
(the run's meta and every file's record) and renames the folder. A crash mid-write leaves
only a ``.tmp_*`` folder, ignored and removed by the next save. ``latest_intact()`` verifies a
checkpoint (every rank reads a share of its files) before resuming from it, and falls back to
an older one with a warning naming the damaged file.
"""

from __future__ import annotations

import errno
import json as _json
import os
import random as _random
import shutil as _shutil
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as _np
import torch

from ..files import FileRecord, WriteError, atomic_save, deferring, file_record, fsync_dir, recording, write_deferred
from ..models.official import CheckpointError
from ..parallel import comm

MARKER = "complete.json"


class SaveError(RuntimeError):
    """A checkpoint was not written; the message names the file, the space, and what is intact."""


# ----------------------------------------------------------------- random state


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


# ----------------------------------------------------------------- verification


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def read_marker(directory: Path) -> dict:
    marker = Path(directory) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (no {MARKER})")
    return _json.loads(marker.read_text())


def verify_files(directory: Path, names: Optional[List[str]] = None) -> List[str]:
    """Problems with the recorded files of a checkpoint (all, or ``names``): missing, another
    size, another checksum. Empty: intact."""
    files = read_marker(directory).get("files", {})
    problems = []
    for name in (sorted(files) if names is None else names):
        size, crc = files[name]
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        actual = path.stat().st_size
        if actual != size:
            problems.append(f"{name} has {actual} bytes, {size} were written")
        elif file_record(path).crc32 != crc:
            problems.append(f"{name} does not match its checksum (written intact: bit rot or a bad copy)")
    return problems


def verify_checkpoint(directory: Path) -> List[str]:
    """All problems of one checkpoint folder, in one process (the verify command)."""
    try:
        meta = read_marker(directory)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    if "files" not in meta:
        return []  # written before checksums were recorded: nothing to check against
    return verify_files(directory)


# ----------------------------------------------------------------- the manager


class CheckpointManager:
    def __init__(self, root: Path, rank: int, world_size: int, keep: int = 2, on_error: str = "stop",
                 asynchronous: bool = False, log=print) -> None:
        self.root, self.rank, self.world_size, self.keep = Path(root), rank, world_size, max(1, keep)
        self.on_error, self.asynchronous, self.log = on_error, asynchronous, log
        self._writer: Optional[threading.Thread] = None
        self._failure: Optional[str] = None  # a background write's error, reported at the next save
        self._pending: Optional[list] = None  # what the next background write writes

    # ---- finding --------------------------------------------------------------------------

    def complete(self) -> List[Path]:
        if not self.root.is_dir():
            return []
        return sorted(d for d in self.root.glob("step_*") if (d / MARKER).is_file())

    def latest(self) -> Optional[Path]:
        done = self.complete()
        return done[-1] if done else None

    def problems(self, directory: Path) -> List[str]:
        """Verified by every rank together (collective): rank r reads every world_size-th file."""
        meta = read_marker(directory)
        names = sorted(meta.get("files", {}))
        mine = verify_files(directory, names[self.rank::self.world_size]) if names else []
        return [p for part in comm.all_gather_object(mine) for p in part]

    def latest_intact(self) -> Optional[Path]:
        """The newest checkpoint whose files all match their records (collective); each damaged
        newer one is named in one warning line."""
        for directory in reversed(self.complete()):
            bad = self.problems(directory)
            if not bad:
                return directory
            self.log(f"warning: checkpoint {directory} is damaged ({bad[0]}"
                     f"{f', and {len(bad) - 1} more' if len(bad) > 1 else ''}): trying the one before")
        return None

    def check_intact(self, directory: Path) -> None:
        """An explicitly named checkpoint must verify: a one-line error otherwise (collective)."""
        bad = self.problems(directory)
        if bad:
            raise CheckpointError(f"checkpoint {directory} is damaged: {bad[0]}"
                                  f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; resume from "
                                  f"another one, or --resume auto to take the newest intact one")

    def load_client(self, directory: Path) -> dict:
        path = Path(directory) / f"client_rank{self.rank:05d}.pt"
        return torch.load(path, map_location="cpu", weights_only=True)

    # ---- saving ---------------------------------------------------------------------------

    def save(self, backend, step: int, client_state: dict, meta: dict, also=None) -> Optional[Path]:
        """Write a checkpoint of every rank (collective). Returns its folder, or None where it
        failed and ``on_error`` is "continue" (the run goes on; the next interval tries again).
        ``also(folder)`` writes more into it (the layout-free form), recorded and verified alike."""
        self.wait()
        tmp, final = self.root / f".tmp_step_{step:08d}", self.root / f"step_{step:08d}"
        previous = self.latest()
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp_step_*"):
                _shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        comm.barrier()
        error = self._check_space(previous) or self._write(backend, tmp, client_state, previous, also)
        errors = [e for e in comm.all_gather_object(error) if e]
        if errors:
            return self._failed(tmp, final, previous, errors[0])
        if self.asynchronous:
            self._writer = threading.Thread(target=self._write_in_background, name="revcol-checkpoint-writer",
                                            args=(tmp, final, step, meta), daemon=False)
            self._writer.start()
            return final
        self._commit(tmp, final, step, meta)
        return final

    def wait(self) -> None:
        """Until the background write (if any) is on disk; a failure on any rank is reported by
        every rank, like a save's (collective)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        failures = [f for f in comm.all_gather_object(self._failure) if f]
        self._failure = None
        if failures:
            self._report(f"a background checkpoint write failed: {failures[0]}")

    def _check_space(self, previous: Optional[Path]) -> Optional[str]:
        """A checkpoint needs about as much as the last one: refuse early where it cannot fit."""
        if previous is None or self.rank != 0:
            return None
        needed = read_marker(previous).get("bytes", 0)
        free = _shutil.disk_usage(self.root).free
        if needed > free:
            return (f"not enough space on {self.root}: the checkpoint needs about {_bytes(needed)} (the last one's "
                    f"size), {_bytes(free)} are free")
        return None

    def _write(self, backend, tmp: Path, client_state: dict, previous: Optional[Path] = None,
               also=None) -> Optional[str]:
        """This rank's part: written with its records (or, asynchronous, copied to host memory).
        None where it went well, else what went wrong."""
        try:
            with (deferring() if self.asynchronous else recording()) as collected:
                backend.save(tmp)
                atomic_save(client_state, tmp / f"client_rank{self.rank:05d}.pt")
                if also is not None:
                    also(tmp)
            if self.asynchronous:
                self._pending = collected  # (path, host copy) pairs for the background writer
            else:
                self._write_records(tmp, collected)
        except (OSError, RuntimeError) as e:
            return self._describe(e, tmp, previous)
        return None

    def _describe(self, e: BaseException, tmp: Path, previous: Optional[Path] = None) -> str:
        path = e.path if isinstance(e, WriteError) else None
        cause = e.cause if isinstance(e, WriteError) else e
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else 0
        free = _shutil.disk_usage(tmp.parent if tmp.parent.is_dir() else self.root.parent).free
        what = f"writing {path}" if path is not None else "writing its files"
        hint = ""
        if isinstance(cause, OSError) and cause.errno == errno.EFBIG:
            hint = " (the per-process file-size limit, `ulimit -f`, was reached)"
        needed = read_marker(previous).get("bytes") if previous is not None else None
        need = f"it needs about {_bytes(needed)} (the last checkpoint's size)" if needed else "it needs more"
        return (f"rank {self.rank}: {what} failed: {type(cause).__name__}: {cause}{hint}; {need}, had written "
                f"{_bytes(written)}, {_bytes(free)} are free")

    def _write_records(self, tmp: Path, records: Dict[Path, FileRecord]) -> None:
        entries = {str(p.relative_to(tmp)): [r.size, r.crc32] for p, r in records.items()}
        (tmp / f"records_rank{self.rank:05d}.json").write_text(_json.dumps(entries))

    def _write_in_background(self, tmp: Path, final: Path, step: int, meta: dict) -> None:
        pending, self._pending = self._pending, None
        try:
            at, _, delay = os.environ.get("REVCOL_SLOW_SAVE", "").partition(":")  # tests: a kill mid-write
            if at and int(at) == step:
                time.sleep(float(delay))
            self._write_records(tmp, write_deferred(pending))
            if self.rank == 0:
                self._await_records(tmp)
                self._commit(tmp, final, step, meta, collective=False)
        except BaseException as e:  # reported at the next save or at the end, by every rank
            self._failure = self._describe(e, tmp)
            try:  # rank 0 is waiting for this rank's part: tell it
                (tmp / f"failed_rank{self.rank:05d}.txt").write_text(self._failure)
            except OSError:
                pass

    def _await_records(self, tmp: Path, timeout_s: float = 3600) -> None:
        deadline = time.monotonic() + timeout_s
        while len(list(tmp.glob("records_rank*.json"))) < self.world_size:
            failed = sorted(tmp.glob("failed_rank*.txt"))
            if failed:
                raise RuntimeError(failed[0].read_text())
            if time.monotonic() > deadline:
                raise TimeoutError(f"the other ranks' parts of {tmp} did not arrive within {timeout_s:.0f} s")
            time.sleep(0.05)

    def _commit(self, tmp: Path, final: Path, step: int, meta: dict, collective: bool = True) -> None:
        if collective:
            comm.barrier()
        if self.rank == 0:
            files: Dict[str, list] = {}
            for part in sorted(tmp.glob("records_rank*.json")):
                files.update(_json.loads(part.read_text()))
            marker = {**meta, "step": step, "world_size": self.world_size, "files": files,
                      "bytes": sum(size for size, _ in files.values())}
            (tmp / MARKER).write_text(_json.dumps(marker))
            if final.exists():
                _shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            for old in self.complete()[: -self.keep]:
                _shutil.rmtree(old, ignore_errors=True)
        if collective:
            comm.barrier()

    def add_folder(self, directory: Path, name: str, write) -> None:
        """Add ``name/`` to the complete checkpoint ``directory`` (collective): ``write(folder)``
        fills a temporary folder beside it on every rank, recorded as a save's files are; then
        rank 0 adds the records to complete.json (replaced atomically) and renames the folder.
        Until then the checkpoint is unchanged; a crash leaves a ``.tmp_`` folder, ignored."""
        directory = Path(directory)
        tmp, final = directory / f".tmp_{name}", directory / name
        if self.rank == 0:
            _shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        comm.barrier()
        with recording() as collected:
            write(tmp)
        mine = {f"{name}/{p.relative_to(tmp)}": [r.size, r.crc32] for p, r in collected.items()}
        parts = comm.all_gather_object(mine)
        if self.rank == 0:
            marker = read_marker(directory)
            files = {k: v for k, v in marker.get("files", {}).items() if not k.startswith(f"{name}/")}
            for part in parts:
                files.update(part)
            marker.update(files=files, bytes=sum(size for size, _ in files.values()))
            if final.exists():
                _shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(directory)
            (directory / f".{MARKER}.tmp").write_text(_json.dumps(marker))
            os.replace(directory / f".{MARKER}.tmp", directory / MARKER)
            fsync_dir(directory)
        comm.barrier()

    def _failed(self, tmp: Path, final: Path, previous: Optional[Path], error: str) -> None:
        comm.barrier()
        if self.rank == 0:
            _shutil.rmtree(tmp, ignore_errors=True)
        comm.barrier()
        self._report(f"checkpoint {final.name} was not saved: {error}; "
                     f"{f'the previous checkpoint {previous} is intact' if previous else 'no earlier checkpoint exists'}")
        return None

    def _report(self, message: str) -> None:
        if self.on_error == "continue":
            self.log(f"warning: {message}; training goes on (train.on_save_error=continue), the next save "
                     f"tries again")
            return
        raise SaveError(f"{message} (train.on_save_error=continue would keep training)")
