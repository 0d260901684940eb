"""Starting DeepSpeed's distributed backend without compiling C++ ops on CPU machines."""

from __future__ import annotations

import os


def init_deepspeed_distributed(timeout_s: int = 300) -> None:
    """NCCL on GPUs, gloo on CPU. On CPU, DeepSpeed would JIT-build its shared-memory
    communication op (~80 s per fresh machine); it is switched off first."""
    import datetime

    import deepspeed
    import torch
    import torch._dynamo  # noqa: F401  imported now: importing it later inside zero.Init (which patches
    # Tensor.__new__) fails with "Signature mismatch between ... new_tensor and tensor_pynew"

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "RANK" not in os.environ:  # one process started without a launcher
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from .distributed import dist_env

    dist_env()  # LOCAL_RANK from the launcher's variables (never the global rank: no cuda:RANK on node 2)
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def restore_functional_linear() -> None:
    """Put torch's own ``torch.nn.functional.linear`` back after a ZeRO-3 run.

    ``deepspeed.zero.Init`` replaces it with ZeRO-3's memory-efficient linear (its backward keeps
    the partitioned weight, not the gathered one) and leaves it so for the life of the process.
    Its weight gradient rounds differently from autograd's, so whatever ran next in the process
    (another run, an evaluation in a notebook) differed from a fresh process by ~1e-7 (measured:
    a DDP run after a ZeRO-3 one in the same processes)."""
    import sys

    import torch

    zero_init = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    original = getattr(getattr(zero_init, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original
