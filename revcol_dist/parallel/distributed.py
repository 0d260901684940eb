"""Process-group set-up for torchrun, the deepspeed launcher, SLURM, or a single process."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistInfo:
    """Read what the launcher set (torchrun and deepspeed set RANK/WORLD_SIZE/LOCAL_RANK; under
    SLURM without them, SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID)."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    return DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def device_for(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


_STORE = None  # the process group's key-value store (the hang watchdog writes its heartbeats there)


def process_store():
    """The key-value store the process group was made with (None without one)."""
    return _STORE


def init_torch_process_group(info: DistInfo, timeout_s: int = 600) -> None:
    """``init_process_group`` from the launcher's environment, on a store this module keeps.

    After a torchrun restart (``--max-restarts``) the workers of the new attempt can meet in a
    store that still holds the previous attempt's addresses, and gloo then dials a dead
    process ("connectFullMesh ... Connection refused"). Each attempt therefore gets its own key
    prefix in the store. Under torchrun the agent hosts the store (it outlives the workers);
    under other launchers rank 0 does."""
    global _STORE
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, timeout=timeout)
        return
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                          is_master=(not agent_hosts and info.rank == 0), timeout=timeout,
                          multi_tenant=not agent_hosts)
    _STORE = dist.PrefixStore(f"revcol/attempt_{attempt}", store)
    dist.init_process_group(backend, store=_STORE, rank=info.rank, world_size=info.world_size, timeout=timeout)


def init_distributed(info: DistInfo, use_deepspeed: bool = False, timeout_s: int = 600) -> None:
    """NCCL on GPUs, gloo on CPU; nothing for a single process without a launcher."""
    if info.world_size == 1 and not use_deepspeed:
        return
    if use_deepspeed:
        from .deepspeed_env import init_deepspeed_distributed

        if "RANK" in os.environ:  # DeepSpeed adopts an initialised group
            init_torch_process_group(info, timeout_s)
        init_deepspeed_distributed(timeout_s)
    else:
        init_torch_process_group(info, timeout_s)
