"""Construction under deepspeed.zero.Init: parameters are partitioned as modules are built,
so the published init must already have happened inside each module's constructor."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import torch, deepspeed
    from revcol_dist.parallel.deepspeed_env import init_deepspeed_distributed
    from revcol_dist.models import create_model
    init_deepspeed_distributed()
    cfg = {"train_batch_size": 2, "zero_optimization": {"stage": 3}}
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        m = create_model("revcol_tiny")
    rank = torch.distributed.get_rank()
    total = sum(p.ds_numel for p in m.parameters())
    local = sum(p.ds_tensor.numel() for p in m.parameters())
    assert all(p.numel() == 0 for p in m.parameters()), "parameters are not partitioned"
    w = m.columns[1].level2.blocks[0].pwconv1.weight
    with deepspeed.zero.GatheredParameters([w, m.columns[3].alpha2, m.columns[0].level0.blocks[0].gamma]):
        std, a, g = w.std().item(), m.columns[3].alpha2.unique().tolist(), m.columns[0].level0.blocks[0].gamma.unique().tolist()
        mx = w.abs().max().item()
    print(f"RESULT rank={rank} total={total} local={local} std={std:.5f} max={mx:.4f} alpha={a} gamma={g}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # gloo/DeepSpeed threads torn down by interpreter exit can abort the process after its
    # work is done ("terminate called without an active exception"): leave without teardown
    import sys, os
    sys.stdout.flush()
    os._exit(0)
    """
)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero_init_two_ranks(tmp_path):
    script = tmp_path / "zinit.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731", str(script)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # two ranks print concurrently: their lines can run together, so match records, not lines
    records = re.findall(r"RESULT (rank=\d+ total=\d+ local=\d+ std=[\d.]+ max=[\d.]+ alpha=\[[^\]]*\] "
                         r"gamma=\[[^\]]*\])", r.stdout)
    assert len(records) == 2, r.stdout
    fields = [dict(kv.split("=", 1) for kv in rec.split()) for rec in records]
    for f in fields:
        assert int(f["total"]) == 30_456_168
        assert abs(float(f["std"]) - 0.02) < 1e-3  # trunc_normal(.02) happened before partitioning
        assert float(f["max"]) <= 2.0
        assert f["alpha"] == "[0.5]" and f["gamma"] == "[9.999999974752427e-07]"
    # Each rank holds about half: sharded, never whole on one rank.
    locals_ = [int(f["local"]) for f in fields]
    assert sum(locals_) >= 30_456_168 and max(locals_) < 0.51 * 30_456_168
