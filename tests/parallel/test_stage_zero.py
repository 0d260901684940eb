"""ZeRO inside a pipeline stage's replicas (``parallel/pipeline/zero.py``) on real gloo
processes: who owns what, gradients reduced to their owner while the backward still runs,
and the owners' weights handed to every replica."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from revcol_dist.parallel.pipeline.zero import owner_runs

from .launch_helpers import free_port


@pytest.mark.parametrize("sizes,parts", [([5, 1, 1, 1, 8, 2, 2], 2), ([1] * 10, 3), ([100, 1, 1], 2),
                                         ([100, 1, 1, 1], 4), ([10, 10, 1000, 10], 4), ([3, 3], 2)])
def test_owner_runs_are_contiguous_balanced_and_never_empty(sizes, parts):
    runs = owner_runs(sizes, parts)
    assert len(runs) == parts and runs[0][0] == 0 and runs[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))  # contiguous, every tensor once
    assert all(b > a for a, b in runs)  # every replica owns something (else it has no optimizer)
    share = sum(sizes) / parts
    for a, b in runs:  # no run exceeds its share by more than its largest tensor
        assert sum(sizes[a:b]) <= share + max(sizes)


def test_fewer_parameters_than_replicas_is_refused():
    with pytest.raises(ValueError, match="pipeline.zero=0 or fewer replicas"):
        owner_runs([3, 3], 4)


def _worker(rank: int, world: int, port: int, out: str, level: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from revcol_dist.parallel import comm
    from revcol_dist.parallel.pipeline.zero import StageZero

    torch.manual_seed(0)  # the same weights on both replicas
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 8), torch.nn.GELU(),
                              torch.nn.Linear(8, 3))
    spare = torch.nn.Parameter(torch.ones(3))  # in run 0, reached by no backward
    names, params = zip(*([("spare", spare)] + list(net.named_parameters())))
    zero = StageZero(params, names, level, None, list(range(world)), rank)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 + rank))  # each replica its own batch
    net(x).pow(2).sum().backward()  # the reference: the replicas' mean gradient, computed apart
    ref = [comm.all_reduce(p.grad) / world if p.grad is not None else None for p in params]
    net.zero_grad()
    zero.prepare()
    for micro in range(2):  # two micro-batches; the last one's backward armed
        if micro == 1:
            zero.arm()
        net(x[micro * 2: micro * 2 + 2]).pow(2).sum().backward()
    zero.reduce()
    result = {"rank": rank, "owned": list(zero.owned_names), "overlapped": zero.overlapped,
              "with_grad": [n for n, p in zip(names, params) if p.grad is not None],
              "grad_err": max((p.grad - g).abs().max().item() for p, g in zip(params, ref) if p.grad is not None)}
    with torch.no_grad():  # the owners' step: their weights change, the others' are overwritten
        for p in zero.owned:
            p.add_(1.0 + rank)
    zero.gather_weights()
    result["weights"] = [p.detach().sum().item() for p in params]
    with open(os.path.join(out, f"r{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.parametrize("level", [1, 2])
def test_stage_zero_on_two_replicas(tmp_path, level):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), level), nprocs=2)
    r = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    names = ["spare"] + [f"{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")]
    assert sorted(r[0]["owned"] + r[1]["owned"]) == sorted(names) and r[0]["owned"] and r[1]["owned"]
    assert r[0]["weights"] == r[1]["weights"]  # every replica holds the owners' new weights
    for x in r:  # level 1: every gradient is the replicas' mean; level 2: only on its owner
        reached = [n for n in (x["owned"] if level == 2 else names) if n != "spare"]
        assert x["with_grad"] == reached  # the unreached one has none, as without ZeRO
        assert x["grad_err"] < 1e-5
        # level 2: run 1 (the later layers) reduced inside the backward; run 0, with the
        # unreached parameter, after it, in the same order on both replicas
        assert x["overlapped"] == (1 if level == 2 else 0)
