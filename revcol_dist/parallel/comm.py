"""Every collective and point-to-point call of the package goes through here.

NCCL moves only CUDA tensors and orders its operations on a stream; gloo moves CPU tensors.
Each function therefore takes a tensor wherever it lives, runs the operation on the group's
device (the current CUDA device under NCCL, the CPU under gloo) and hands the result back on
the caller's device. Point-to-point transfers are issued as one batch per exchange
(``exchange``), so a send and the matching receive of a neighbour never wait on each other's
ordering. A test fails if another module calls ``torch.distributed`` collectives directly.

Without an initialised process group every function is the identity of a world of one.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def rank(group=None) -> int:
    """This process's rank (in ``group``, default the world)."""
    return dist.get_rank(group) if initialized() else 0


def device() -> torch.device:
    """Where this process group's collectives run."""
    if initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on(t: torch.Tensor, where: torch.device) -> torch.Tensor:
    return t if t.device == where else t.to(where)


def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """The reduction over the group, as a new tensor on ``t``'s device (``t`` is unchanged)."""
    if not initialized():
        return t.clone()
    work = _on(t, device()).clone()
    dist.all_reduce(work, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
    return _on(work, t.device)


def all_reduce_(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In place, for buffers that already live on the group's device (gradients under NCCL)."""
    if not initialized():
        return t
    if t.device != device():
        t.copy_(all_reduce(t, op, group))
        return t
    dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
    return t


class Pending:
    """An asynchronous collective: ``wait()`` returns its result on the caller's device. Under
    NCCL the operation is ordered after the work already queued on the current stream (the
    gradients it reads), and ``wait()`` orders what follows after it, without a host sync."""

    def __init__(self, work, result: torch.Tensor, device_: torch.device) -> None:
        self.work, self.result, self.device = work, result, device_

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return _on(self.result, self.device)


def reduce_async(t: torch.Tensor, dst: int, group=None) -> Pending:
    """The sum over the group arrives in ``t`` on global rank ``dst`` (what ``t`` holds elsewhere
    afterwards is undefined). ``t`` is the caller's to give away: it is the buffer sent."""
    if not initialized():
        return Pending(None, t, t.device)
    work = _on(t, device())
    return Pending(dist.reduce(work, dst=dst, group=group, async_op=True), work, t.device)


def broadcast_(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In place: global rank ``src``'s ``t`` on every rank of the group."""
    if not initialized():
        return t
    if t.device != device():
        work = _on(t, device())
        dist.broadcast(work, src=src, group=group)
        t.copy_(work)
        return t
    dist.broadcast(t, src=src, group=group)
    return t


def all_gather_flat(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``t`` (1-D, the same size on all ranks) concatenated in group-rank order."""
    if not initialized():
        return t.clone()
    work = _on(t, device()).contiguous()
    out = torch.empty(work.numel() * world_size(group), dtype=work.dtype, device=work.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, work, group=group)
    return _on(out, t.device)


def mean(t: torch.Tensor, group=None) -> torch.Tensor:
    return all_reduce(t, "sum", group) / world_size(group)


def all_gather(t: torch.Tensor, group=None) -> List[torch.Tensor]:
    """Every rank's ``t`` (same shape on all ranks), on ``t``'s device."""
    if not initialized():
        return [t.clone()]
    work = _on(t, device()).contiguous()
    parts = [torch.empty_like(work) for _ in range(world_size(group))]
    dist.all_gather(parts, work, group=group)
    return [_on(p, t.device) for p in parts]


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's picklable ``obj`` (metadata, statistics: small)."""
    if not initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> Optional[List[Any]]:
    """Every rank's ``obj`` on ``dst`` (None elsewhere)."""
    if not initialized():
        return [obj]
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def barrier() -> None:
    if initialized():
        dist.barrier()


def new_group(ranks: Sequence[int]):
    """Every rank must call this for every group, in the same order."""
    return dist.new_group(list(ranks))


class Exchange:
    """Pending point-to-point transfers of one batch: ``wait()`` before reading what was
    received or reusing what was sent."""

    def __init__(self, works, keep) -> None:
        self.works, self.keep = works, keep

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works, self.keep = [], []


def exchange(sends: Sequence[tuple] = (), recvs: Sequence[tuple] = ()) -> Exchange:
    """One batch of point-to-point operations: ``sends`` are (tensor, dst) and ``recvs``
    (buffer, src), buffers on the group's device, issued together (``batch_isend_irecv``).
    NCCL runs a batch as one group: a send and a receive that a step needs at the same time
    (a pipeline stage's output going forward while a gradient comes back) belong in one call,
    so that neither waits for the other. The first batch on a group must involve every rank."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, buf, peer) for buf, peer in recvs]
    if not ops:
        return Exchange([], [])
    return Exchange(dist.batch_isend_irecv(ops), [op.tensor for op in ops])
