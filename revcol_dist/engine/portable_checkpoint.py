"""Writing and loading the layout-free checkpoint form (``revcol_dist/portable.py``) for any
backend: what lets a run continue on another world size, ZeRO stage, DDP, DeepSpeed or the
pipeline. Every rank iterates the same tensors in the same order; each tensor is written by one
of the ranks that hold it (round robin), so the writing is spread and no rank holds more than
its share plus one parameter."""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Optional

from ..parallel import comm
from ..parallel.portable_state import ema_items, load_ema, optimizer_steps
from ..portable import PortableReader, PortableWriter, write_index

FOLDER = "portable"


def write_portable(directory: Path, backend, ema, meta: dict) -> None:
    """Collective. ``meta``: the run's position (step, data, seeds); the optimizer's and the
    EMA's counters are added here."""
    layout = backend.portable_layout()
    rank = comm.rank()
    writer = PortableWriter(Path(directory), rank)
    items = layout.items()
    if ema is not None:
        items = chain(items, ema_items(ema, layout))
    for i, (key, tensor, holders) in enumerate(items):
        holders = list(holders)
        if tensor is not None and holders[i % len(holders)] == rank:
            writer.add(key, tensor)
    entries = comm.gather_object(writer.close(), dst=0)
    full = {**meta, "optimizer_steps": optimizer_steps(backend.optimizer),
            "ema_updates": ema.updates if ema is not None else None}
    if rank == 0:
        merged = {}
        for part in entries:
            merged.update(part)
        write_index(Path(directory), merged, full)


def load_portable(directory: Path, backend, ema) -> dict:
    """Collective under ZeRO. Every rank reads only what it holds. Returns the meta."""
    reader = PortableReader(Path(directory))
    missing = [n for n, p in backend.model.named_parameters() if p.requires_grad and f"param/{n}" not in reader]
    if missing:
        raise ValueError(f"{directory} has no weights for {missing[0]} (and {len(missing) - 1} more): "
                         f"a checkpoint of another model")
    layout = backend.portable_layout()
    layout.load(reader, reader.meta["optimizer_steps"])
    if ema is not None:
        if reader.meta.get("ema_updates") is None:
            raise ValueError(f"{directory} holds no EMA: resume with train.ema_decay=0 or start a new run")
        load_ema(ema, layout, reader)
        ema.updates = reader.meta["ema_updates"]
    reader.close()
    comm.barrier()
    return reader.meta


def portable_folder(checkpoint: Path) -> Optional[Path]:
    path = Path(checkpoint) / FOLDER
    from ..portable import is_portable

    return path if is_portable(path) else None
