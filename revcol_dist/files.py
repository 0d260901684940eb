"""Files written so that a crash mid-write never destroys the previous version, each with its
size and CRC-32 computed while it is written (no second read), so that a checkpoint can be
verified later.

``recording(root)`` collects the record of every file written under ``root`` by
``atomic_save`` or ``save_checksummed``; ``deferring()`` instead keeps a host copy of what
would be written, for a background writer (asynchronous checkpoints).
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import tempfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class FileRecord:
    size: int
    crc32: int


class WriteError(OSError):
    """Writing ``path`` failed; ``cause`` is the operating system's error where there was one
    (a full disk, a file-size limit), else what the serializer raised."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        super().__init__(f"writing {path} failed: {cause}")
        self.path, self.cause = Path(path), cause


class _Checksummed(io.RawIOBase):
    """A write-only stream that passes bytes on to ``f`` and keeps their count and CRC-32
    (and the OS error of a failed write: torch.save reports only that the stream fell short)."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f, self.size, self.crc = f, 0, 0
        self.error: Optional[OSError] = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = e
            raise
        self.crc = zlib.crc32(b, self.crc)
        self.size += len(b)
        return n if n is not None else len(b)


class _State(threading.local):
    records: Optional[Dict[Path, FileRecord]] = None
    deferred: Optional[List[Tuple[Path, Any]]] = None


_state = _State()


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def to_host(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are CPU copies: training may go on changing the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, collections.OrderedDict):  # a state_dict: keep its class and _metadata
        out = collections.OrderedDict((k, to_host(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def save_checksummed(obj: Any, path: str | os.PathLike, **save_kw) -> FileRecord:
    """``torch.save(obj, path)`` through a checksumming stream, fsynced; recorded or deferred."""
    path = Path(path)
    if _state.deferred is not None:
        _state.deferred.append((path, to_host(obj)))
        return FileRecord(-1, 0)
    stream = None
    try:
        with open(path, "wb") as f:
            stream = _Checksummed(f)
            torch.save(obj, stream, **save_kw)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        raise WriteError(path, (stream.error if stream is not None else None) or e) from e
    record = FileRecord(stream.size, stream.crc)
    if _state.records is not None:
        _state.records[path] = record
    return record


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path``: renamed over it (the folder fsynced) when the block
    succeeds, removed when it does not. A crash leaves ``path`` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> FileRecord:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    if _state.deferred is not None:
        return save_checksummed(obj, path)
    records, _state.records = _state.records, None
    try:
        with _replacing(path) as tmp:
            try:
                record = save_checksummed(obj, tmp)
            except WriteError as e:
                raise WriteError(path, e.cause) from e
    finally:
        _state.records = records
    if records is not None:
        records[path] = record
    return record


def file_record(path: str | os.PathLike, chunk: int = 1 << 24) -> FileRecord:
    """Size and CRC-32 of a file on disk (reads it once, in chunks)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return FileRecord(size, crc)
            crc, size = zlib.crc32(block, crc), size + len(block)


@contextlib.contextmanager
def recording() -> Iterator[Dict[Path, FileRecord]]:
    """Within the block, every file this thread writes through this module is recorded."""
    outer, _state.records = _state.records, {}
    try:
        yield _state.records
    finally:
        _state.records = outer


@contextlib.contextmanager
def deferring() -> Iterator[List[Tuple[Path, Any]]]:
    """Within the block nothing is written: (path, host copy) pairs are collected instead."""
    outer, _state.deferred = _state.deferred, []
    try:
        yield _state.deferred
    finally:
        _state.deferred = outer


def _os_error(e: Exception) -> Exception:
    """The OS error behind a serializer's error ("... (os error 27)"), where it names one."""
    import re

    if isinstance(e, OSError):
        return e
    m = re.search(r"(.*)\(os error (\d+)\)", str(e))
    return OSError(int(m.group(2)), os.strerror(int(m.group(2)))) if m else e


class DeferredWrite:
    """A file made by a function of its (temporary) path rather than by torch.save, e.g. a
    safetensors shard; what it writes must already be on the host."""

    def __init__(self, write: Callable[[Path], None]) -> None:
        self.write = write


def write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Optional[FileRecord]:
    """``write(tmp)`` into a temporary file beside ``path``, fsync, rename over ``path``;
    recorded (size, CRC-32) like torch.save's files, or deferred inside ``deferring``."""
    path = Path(path)
    if _state.deferred is not None:
        _state.deferred.append((path, DeferredWrite(write)))
        return None
    with _replacing(path) as tmp:
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except Exception as e:  # safetensors reports the OS error inside its own type
            raise WriteError(path, _os_error(e)) from e
        record = file_record(tmp)
    if _state.records is not None:
        _state.records[path] = record
    return record


def write_deferred(items: List[Tuple[Path, Any]]) -> Dict[Path, FileRecord]:
    """Write what ``deferring`` collected (each file atomically); their records."""
    with recording() as records:
        for path, obj in items:
            if isinstance(obj, DeferredWrite):
                write_file(path, obj.write)
            else:
                atomic_save(obj, path)
    return dict(records)
