"""DDP over 2 real gloo processes sees ordinary gradients from the reversible engine."""

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from revcol_dist.models import create_model

CFG = dict(channels=(16, 24, 32, 40), layers=(1, 1, 2, 1), num_classes=7, drop_path=0.0, inter_supv=True,
           boundary_interval=2)


def _model():
    torch.manual_seed(0)
    return create_model("revcol_tiny", **CFG).train()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 64, 64, generator=g), torch.tensor([0, 3, 5, 6])


def _loss(out, y):
    loss = F.cross_entropy(out.logits, y) + sum(F.cross_entropy(a, y) for a in out.aux_logits)
    return loss + sum(r.square().mean() for r in out.reconstructions)


def _worker(rank, world, port, find_unused, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(_model(), find_unused_parameters=find_unused)
    x, y = _data()
    shard = slice(rank * 2, rank * 2 + 2)
    for _ in range(2):  # a second step catches "unused parameter" errors of the first
        model.zero_grad(set_to_none=True)
        _loss(model(x[shard]), y[shard]).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, out_path)
    # DDP's reducer holds the process group: free it before the group, and leave together, so that no
    # rank's gloo threads are still up when its interpreter exits (that aborted one rank in 1 of ~15)
    del model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.parametrize("find_unused", [True, False])
def test_ddp_matches_single_process(find_unused, tmp_path):
    out = tmp_path / "grads.pt"
    port = 29600 + int(find_unused)
    mp.spawn(_worker, args=(2, port, find_unused, str(out)), nprocs=2, join=True)
    ddp = torch.load(out)
    m = _model()
    x, y = _data()
    _loss(m(x), y).backward()
    worst = 0.0
    for n, p in m.named_parameters():
        assert ddp[n] is not None, n
        denom = p.grad.norm().item()
        if denom == 0:
            assert ddp[n].norm().item() == 0, n
            continue
        worst = max(worst, (ddp[n] - p.grad).norm().item() / denom)
    assert worst < 1e-5, worst
