"""Starting DeepSpeed's distributed backend without compiling C++ ops on CPU machines."""

from __future__ import annotations

import os


def init_deepspeed_distributed(timeout_s: int = 300) -> None:
    """NCCL on GPUs, gloo on CPU. On CPU, DeepSpeed would JIT-build its shared-memory
    communication op (~80 s per fresh machine); it is switched off first."""
    import datetime

    import deepspeed
    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
