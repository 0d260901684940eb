"""Per-rank memory of model states (parameters, gradients, optimizer states, ZeRO buffers)
for ZeRO-0/1/2/3 at 1, 2 and 4 ranks on RevCol-S, beside DeepSpeed's own estimators.

python benchmarks/zero_memory.py          (one JSON line on stdout; runs torchrun jobs on gloo)

Buckets are set to 5e6 elements. Measured after one AdamW step at batch 1 per rank, 32x32:
every live tensor storage is
summed (gc walk), minus what was live before the model was built, so activations (freed
after the step) do not count. fp32 training, so the estimators' mixed-precision figures
(16 bytes/parameter at ZeRO-0) are an upper frame, not the same accounting.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

WORKER = textwrap.dedent(
    """
    import gc, json, sys, torch
    from revcol_dist.parallel.deepspeed_env import init_deepspeed_distributed
    from revcol_dist.plan.measure import build_and_step, zero_config

    def live_bytes():  # resident after the step (not the peak the planner test meters)
        seen, total = set(), 0
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                    st = o.untyped_storage()
                    if st.data_ptr() not in seen:
                        seen.add(st.data_ptr()); total += st.nbytes()
            except Exception:
                pass
        return total

    stage, out = int(sys.argv[1]), sys.argv[2]
    init_deepspeed_distributed()
    torch.set_num_threads(1)
    world = torch.distributed.get_world_size()
    gc.collect(); base = live_bytes()
    engine, n_params = build_and_step("revcol_small", stage, zero_config(stage, world, batch=1), batch=1, res=32)
    gc.collect()
    used = live_bytes() - base
    rank = torch.distributed.get_rank()
    allr = [None] * world
    torch.distributed.all_gather_object(allr, used)
    if rank == 0:
        json.dump({"per_rank_bytes": allr, "params": n_params}, open(out, "w"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def estimates(n_params: int, world: int) -> dict:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    largest = 1792 * 4 * 512  # RevCol-S's largest layer (a level-3 pwconv)
    z3 = estimate_zero3_model_states_mem_needs(n_params, largest, num_gpus_per_node=world, num_nodes=1,
                                               cpu_offload=False, cpu_offload_params=False, zero_init=True,
                                               additional_buffer_factor=1.0)[1]
    z2 = estimate_zero2_model_states_mem_needs(n_params, num_gpus_per_node=world, num_nodes=1, cpu_offload=False,
                                               additional_buffer_factor=1.0)[1]
    return {"zero2_estimate_bytes": int(z2), "zero3_estimate_bytes": int(z3)}


def main() -> None:
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    n_params = None
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        for world in (1, 2, 4):
            for stage in (0, 1, 2, 3):
                out = Path(tmp) / f"r{world}_{stage}.json"
                r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                                    "--master_port", str(free_port()), str(script), str(stage), str(out)],
                                   capture_output=True, text=True, env=env, timeout=900)
                if r.returncode != 0:
                    raise SystemExit(r.stderr[-3000:])
                got = json.loads(out.read_text())
                n_params = got["params"]
                results[f"zero{stage}_ranks{world}"] = max(got["per_rank_bytes"])
    ratio = {f"zero{s}": {w: results[f"zero{s}_ranks{w}"] / results[f"zero{s}_ranks1"] for w in (2, 4)} for s in range(4)}
    print(json.dumps({
        "benchmark": "zero_memory", "model": "revcol_small", "params": n_params, "dtype": "fp32",
        "per_rank_bytes": results, "over_one_rank": ratio,
        "estimators_bytes": {w: estimates(n_params, w) for w in (1, 2, 4)},
        "zero3_2ranks_over_1rank": ratio["zero3"][2],
    }))


if __name__ == "__main__":
    main()
