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


class LaunchError(RuntimeError):
    """The launcher's environment does not say which GPU this process drives."""


# Where launchers put the node-local rank, in the order they are trusted.
_LOCAL_RANK_VARS = ("LOCAL_RANK",  # torchrun, the deepspeed launcher
                    "SLURM_LOCALID",  # srun
                    "OMPI_COMM_WORLD_LOCAL_RANK",  # Open MPI's mpirun (deepspeed --launcher openmpi)
                    "MPI_LOCALRANKID", "PMI_LOCAL_RANK",  # MPICH / Intel MPI
                    "MV2_COMM_WORLD_LOCAL_RANK")  # MVAPICH


def local_rank_from_env(env, gpus_per_node: int) -> int:
    """The node-local rank: the launcher's variable if it set one; with one process per node
    (or no GPU) 0; else ``RANK % LOCAL_WORLD_SIZE`` where the launcher said how many ranks a
    node runs. Anything else would guess (``cuda:RANK`` does not exist on the second node; 0
    puts every rank on the first GPU), so it is an error that names the fix."""
    for var in _LOCAL_RANK_VARS:
        if env.get(var, "") != "":
            return int(env[var])
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    if world == 1 or gpus_per_node == 0:
        return 0
    per_node = env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    if per_node:
        return rank % int(per_node)
    raise LaunchError(f"rank {rank} of {world}: the launcher set no LOCAL_RANK (nor SLURM_LOCALID, "
                      f"OMPI_COMM_WORLD_LOCAL_RANK, LOCAL_WORLD_SIZE), so this process cannot tell which of the "
                      f"node's {gpus_per_node} GPUs is its own: start it with torchrun or the deepspeed launcher, "
                      f"or export LOCAL_RANK")


def dist_env(env=None) -> DistInfo:
    """Read what the launcher set (torchrun and deepspeed set RANK/WORLD_SIZE/LOCAL_RANK; under
    SLURM without them, SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; Open MPI and MPICH their own).
    The resolved values are written back so that DeepSpeed and torch read the same."""
    env = os.environ if env is None else env
    if "RANK" not in env:
        for rank_var, world_var in (("SLURM_PROCID", "SLURM_NTASKS"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                                    ("PMI_RANK", "PMI_SIZE")):
            if rank_var in env and world_var in env:
                env["RANK"], env["WORLD_SIZE"] = env[rank_var], env[world_var]
                break
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = local_rank_from_env(env, gpus)
    if "RANK" in env:
        env["LOCAL_RANK"] = str(local)
    if gpus and local >= gpus:
        raise LaunchError(f"LOCAL_RANK={local} but this node has {gpus} GPUs: start at most {gpus} processes per "
                          f"node (--nproc_per_node / --num_gpus)")
    return DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), local)


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
