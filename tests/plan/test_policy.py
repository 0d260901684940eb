"""model.memory_policy: the planner's choice (plain where it fits, else reversible), and the
launchers applying it."""

import pytest
import yaml

from revcol_dist.plan.model import PlanInput, make_plan
from revcol_dist.plan.policy import choose_memory_policy

from ..parallel.launch_helpers import losses, run_single, write_config


def test_plain_where_it_fits_else_reversible():
    """RevCol-B at micro-batch 128, bf16: plain needs ~40 GiB (39 measured on the H200), so an
    H200's 141 GiB takes plain and a 24 GiB card the reversible columns."""
    big = PlanInput(model="revcol_base", gpus_per_node=1, zero=0, batch=128, res=224, gpu_mem_gib=141)
    choice, why = choose_memory_policy(big)
    assert choice == "plain" and "fits" in why and "141 GiB" in why
    plain_gib = make_plan(PlanInput(**{**big.__dict__, "plain_columns": 16, "lean_blocks": False}))[
        "bytes_per_gpu"]["total"] / 2**30
    assert 30 < plain_gib < 50, plain_gib
    small = PlanInput(**{**big.__dict__, "gpu_mem_gib": 24})
    choice, why = choose_memory_policy(small)
    assert choice == "reversible" and "would need" in why
    assert make_plan(small)["fits"]


@pytest.mark.slow
@pytest.mark.launches
def test_launcher_applies_the_policy(tmp_path):
    """auto on a CPU: reversible, said; plain: the same losses as reversible (fp32, 1e-5)."""
    from revcol_dist.data.digits import prepare_digits

    root = tmp_path / "digits"
    prepare_digits(root)
    runs = {}
    for policy in ("auto", "plain"):
        cfg = write_config(tmp_path, policy, root, steps=2)
        r = run_single(cfg, "--set", f"model.memory_policy={policy}")
        assert r.returncode == 0, r.stderr[-2000:]
        runs[policy] = (losses(tmp_path / policy), r.stdout)
    assert "model.memory_policy=auto: reversible (no GPU memory" in runs["auto"][1]
    a, p = runs["auto"][0], runs["plain"][0]
    assert a.keys() == p.keys() == {1, 2}
    assert all(abs(a[s] - p[s]) <= 1e-5 * abs(a[s]) for s in a), (a, p)
    assert yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())["model"]["memory_policy"] == "plain"
