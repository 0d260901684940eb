"""One communication module: nothing else calls torch.distributed collectives (where NCCL's
device rules could be broken unseen on gloo), and it behaves on real gloo processes."""

import ast
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

PKG = Path(__file__).resolve().parents[2] / "revcol_dist"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
               "all_gather_single", "gather",
               "gather_object", "scatter", "all_to_all", "barrier", "send", "recv", "isend", "irecv",
               "batch_isend_irecv", "P2POp", "new_group"}


def _distributed_calls(path: Path):
    """(line, function) of each call of a torch.distributed collective in the file."""
    tree = ast.parse(path.read_text())
    aliases, direct = {"torch.distributed"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            direct |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in aliases:
            yield node.lineno, f.attr
        elif isinstance(f, ast.Name) and f.id in direct:
            yield node.lineno, f.id


def test_only_the_communication_module_calls_collectives():
    stray = [f"{p.relative_to(PKG.parent)}:{line} {fn}" for p in sorted(PKG.rglob("*.py"))
             if p.name != "comm.py" for line, fn in _distributed_calls(p)]
    assert not stray, "call revcol_dist.parallel.comm instead:\n" + "\n".join(stray)
    assert list(_distributed_calls(PKG / "parallel" / "comm.py")), "the scan finds nothing: it is broken"


def test_the_scan_sees_every_spelling(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import torch\nimport torch.distributed as dist\nfrom torch.distributed import all_reduce\n"
                 "from torch import distributed as td\n"
                 "dist.all_reduce(x)\ntorch.distributed.broadcast(x, 0)\nall_reduce(x)\ntd.isend(x, 1)\n")
    assert [fn for _, fn in _distributed_calls(f)] == ["all_reduce", "broadcast", "all_reduce", "isend"]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from revcol_dist.parallel import comm

    results = {}
    x = torch.full((3,), float(rank + 1))
    total = comm.all_reduce(x)
    results["sum"] = total.tolist()
    results["input_untouched"] = x.tolist() == [float(rank + 1)] * 3
    results["max"] = comm.all_reduce(x, "max").tolist()
    results["mean"] = comm.mean(x).tolist()
    results["gathered"] = [t.tolist() for t in comm.all_gather(x[:1])]
    results["objects"] = comm.all_gather_object({"rank": rank})
    results["device"] = str(comm.device())
    # both ranks send to each other and receive in one batch: paired, whatever the order
    peer = 1 - rank
    buf = torch.empty(1000)
    comm.exchange(sends=[(torch.full((1000,), float(rank)), peer)], recvs=[(buf, peer)]).wait()
    results["received"] = float(buf.mean())
    torch.save(results, f"{out}/rank{rank}.pt")
    comm.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.multiprocess
def test_collectives_and_paired_exchange_on_gloo(tmp_path):
    from .launch_helpers import free_port

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["sum"] == [3.0] * 3 and r["input_untouched"] and r["max"] == [2.0] * 3 and r["mean"] == [1.5] * 3
        assert r["gathered"] == [[1.0], [2.0]] and r["objects"] == [{"rank": 0}, {"rank": 1}]
        assert r["device"] == "cpu" and r["received"] == float(1 - rank)


def test_a_world_of_one_needs_no_process_group():
    from revcol_dist.parallel import comm

    x = torch.ones(2)
    assert comm.all_reduce(x).tolist() == [1.0, 1.0] and comm.all_reduce(x) is not x
    assert comm.all_gather_object(5) == [5] and comm.world_size() == 1 and comm.rank() == 0
