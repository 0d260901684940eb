"""Several runs of one launcher in one launch: ``scenario_worker.py LAUNCHER RUNS.json``.

RUNS.json is a list of argument lists; each is passed to the launcher's ``main()`` in turn, in
the same processes (under torchrun: the same ranks and world process group, which the first
run makes and which outlives the launcher's destroy at the end of each run: DeepSpeed keeps
its groups). It saves the start-up of a launch (importing torch and
DeepSpeed, ~2 s a rank) per run, where a test needs many runs of one layout. Each run still
builds its own Trainer, engine and data streams from nothing; the first run of a launch is
exactly a fresh process. Runs of different layouts (DDP, ZeRO stages, the pipeline) can share
a launch of the same number of ranks. Rank 0 prints ``scenario <i>: start`` before run i (its
output follows, up to the next such line), every rank ``scenario <i>: exit <status> (rank <r>)``
after it (``run_outputs`` in test_any_layout.py splits a launch's output by run). The exit status
is 0 only if every run's ``main()`` returned 0 on this rank.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path


def _launcher(path: str):
    spec = importlib.util.spec_from_file_location(f"launcher_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    import torch.distributed as dist

    launcher, runs = _launcher(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    destroy = dist.destroy_process_group  # the launcher destroys the world group at its end; DeepSpeed
    dist.destroy_process_group = lambda group=None: None if group is None else destroy(group)  # keeps it
    statuses, rank = [], int(os.environ.get("RANK", "0"))
    for i, argv in enumerate(runs):
        if rank == 0:
            print(f"scenario {i}: start", flush=True)
        status = launcher.main(argv)
        print(f"scenario {i}: exit {status} (rank {rank})", flush=True)
        statuses.append(status)
    if dist.is_initialized():
        destroy()
    return 0 if all(s == 0 for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
