"""The layout-free checkpoint form: fp32 tensors by name, in safetensors shards, plus JSON.

A checkpoint written by 2 ZeRO-3 ranks, a DDP job or a pipeline holds the same thing here:
every parameter's fp32 weights, its optimizer moments and its EMA under the model's own
parameter names (``param/<name>``, ``exp_avg/<name>``, ``ema/<name>``, ...), and the run's
position (step, data position, seeds) in ``portable.json``. Any layout can load it.

Tensors are stored flat (1-D; shapes in the index) so that a reader can take any contiguous
range of a parameter without reading the rest: a ZeRO rank reads only the elements of its
partition. Writers hold at most ``shard_bytes`` before a shard goes to disk, so neither
writing nor reading ever needs the whole checkpoint in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch

FORMAT = "revcol-portable/1"
INDEX = "portable.json"
SHARD_BYTES = 1 << 28  # a writer holds at most this much before its shard goes to disk


def _shard_name(rank: int, k: int) -> str:
    return f"portable-r{rank:05d}-{k:04d}.safetensors"


class PortableWriter:
    """One rank's share: ``add`` whole tensors, ``close`` returns their index entries."""

    def __init__(self, directory: Path, rank: int, shard_bytes: int = SHARD_BYTES) -> None:
        self.directory, self.rank, self.shard_bytes = Path(directory), rank, shard_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self.entries: Dict[str, dict] = {}
        self.files: List[str] = []
        self._buffer: Dict[str, torch.Tensor] = {}
        self._bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.entries or name in self._buffer:
            raise ValueError(f"{name} written twice")
        flat = tensor.detach().to("cpu", torch.float32).reshape(-1).clone()
        self._buffer[name] = flat
        self.entries[name] = {"shape": list(tensor.shape)}
        self._bytes += flat.numel() * 4
        if self._bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        from safetensors.torch import save_file

        from .files import write_file

        name = _shard_name(self.rank, len(self.files))
        tensors = self._buffer  # host copies already: a deferred (background) write may take them
        write_file(self.directory / name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
        for key in self._buffer:
            self.entries[key]["file"] = name
        self.files.append(name)
        self._buffer, self._bytes = {}, 0

    def close(self) -> Dict[str, dict]:
        self._flush()
        return self.entries


def write_index(directory: Path, entries: Dict[str, dict], meta: dict) -> Path:
    """The index of every rank's entries plus the run's position (written once, last)."""
    from .files import write_file

    path = Path(directory) / INDEX
    text = json.dumps({"format": FORMAT, "meta": meta, "tensors": entries}, indent=1)
    write_file(path, lambda tmp: Path(tmp).write_text(text))
    return path


def is_portable(directory: Path) -> bool:
    return (Path(directory) / INDEX).is_file()


class PortableReader:
    """Reads whole tensors or flat ranges of them, opening each shard once, lazily."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        index = json.loads((self.directory / INDEX).read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{self.directory / INDEX} is not a {FORMAT} index (format {index.get('format')!r})")
        self.meta: dict = index["meta"]
        self.tensors: Dict[str, dict] = index["tensors"]
        self._open: Dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self.tensors[name]["shape"])

    def _handle(self, name: str):
        if name not in self.tensors:
            raise KeyError(f"{self.directory} holds no tensor {name!r}")
        file = self.tensors[name]["file"]
        if file not in self._open:
            from safetensors import safe_open

            self._open[file] = safe_open(str(self.directory / file), framework="pt")
        return self._open[file]

    def full(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name).view(self.shape(name))

    def flat_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, read without the rest."""
        return self._handle(name).get_slice(name)[start:stop]

    def close(self) -> None:
        self._open.clear()

