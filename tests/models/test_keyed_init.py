"""Initial weights as a function of (seed, parameter name): the same whole, and one pipeline
stage at a time from the meta device, bit for bit; and a stage's build costs its share of host
memory, not the whole model's (peak RSS of a fresh process, RevCol-L)."""

import sys
from pathlib import Path

import pytest
import torch

from revcol_dist.models import create_model
from revcol_dist.models.init import initialize, materialize
from revcol_dist.parallel.pipeline.partition import column_modules, split_columns

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
KW = dict(channels=[8, 16, 24, 32], layers=[1, 1, 2, 1], num_columns=4, num_classes=10, inter_supv=True)


def test_keyed_by_seed_and_name_not_by_what_was_drawn_before():
    torch.manual_seed(0)
    a = create_model("revcol_tiny", **KW)
    initialize(a, 5)
    torch.manual_seed(1)
    torch.rand(1000)  # the global generator elsewhere: no effect
    b = create_model("revcol_tiny", **KW)
    initialize(b, 5)
    c = create_model("revcol_tiny", **KW)
    initialize(c, 6)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if n.endswith("weight") and pa.dim() > 1:
            assert not torch.equal(pa, pc), n  # another seed draws other weights
            assert abs(pa.std().item() - 0.02) < 0.01, n  # the published trunc_normal(.02)
    assert torch.all(a.columns[2].alpha1 == 0.5) and torch.all(a.columns[0].level1.blocks[0].gamma == 1e-6)


@pytest.mark.parametrize("stages", [2, 3])
def test_each_stage_from_the_meta_device_equals_the_whole_build(stages):
    whole = create_model("revcol_tiny", **KW)
    initialize(whole, 11)
    reference = dict(whole.named_parameters())
    seen = set()
    for stage in range(stages):
        with torch.device("meta"):
            model = create_model("revcol_tiny", **KW)
        groups, _ = split_columns(model, stages)
        materialize(model, [m for c in groups[stage] for m in column_modules(model)[c]], 11, "cpu")
        for name, p in model.named_parameters():
            assert not p.is_meta, name
            if p.numel():
                assert torch.equal(p, reference[name]), name
                seen.add(name)
    assert seen == set(reference)  # every parameter on one of the stages


@pytest.mark.slow
def test_a_stage_build_costs_its_share_of_host_memory():
    sys.path.insert(0, str(BENCH))
    from stage_build_memory import measure

    # anonymous memory (RssAnon): measured as total RSS, a process started from the full suite
    # (cv2 imported there sets LD_LIBRARY_PATH) counted ~260 MiB more of mapped library pages
    meta = measure("revcol_large", 4, 1, "meta")
    whole = measure("revcol_large", 4, 1, "whole")
    share = meta["stage_bytes"]
    assert meta["peak_added_bytes"] <= 1.2 * share + 64 * 2**20, meta
    assert whole["peak_added_bytes"] >= 2.5 * meta["peak_added_bytes"], (whole, meta)  # the old way: the whole model


def test_a_stage_loads_only_its_own_tensors_of_a_pretrained_file(tmp_path):
    """The file is memory-mapped; the stage copies its own tensors and leaves the rest unread."""
    from revcol_dist.engine.pretrained import load_pretrained
    from revcol_dist.models.official import to_official_state_dict

    source = create_model("revcol_tiny", **KW)
    initialize(source, 3)
    torch.save(to_official_state_dict(source), tmp_path / "w.pth")
    with torch.device("meta"):
        model = create_model("revcol_tiny", **KW)
    groups, _ = split_columns(model, 2)
    materialize(model, [m for c in groups[1] for m in column_modules(model)[c]], 0, "cpu")
    mine = {k for k, v in model.state_dict().items() if v.numel()}
    report = load_pretrained(model, str(tmp_path / "w.pth"), only=mine.__contains__)
    assert report.loaded == len(mine) and not report.missing
    ref = source.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]) if v.numel() else k not in mine, k
