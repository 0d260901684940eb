"""The planner against measured memory: model states of RevCol-T/S under ZeRO-0/3 at 1-4 gloo
ranks and of the pipeline 2x1 and 2x2 with pipeline.zero 0/1/2 (every allocation of build + DeepSpeed init + one AdamW step, dispatch-level meter), and
activations of a reversible training step in one process."""

import json
import subprocess
import sys

import pytest
import torch

from revcol_dist.models import create_model
from revcol_dist.monitor.live_bytes import LiveBytes
from revcol_dist.plan.model import PlanInput, make_plan
from revcol_dist.plan.measure import predicted

from ..parallel.launch_helpers import REPO, env, free_port


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("world,configs", [
    (1, ["revcol_tiny:0", "revcol_small:0", "revcol_tiny:3", "revcol_small:3"]),
    (2, ["revcol_tiny:3", "revcol_small:3", "revcol_small:0:p2", "revcol_small:2:p2"]),  # pipeline 2x1
    (3, ["revcol_tiny:3"]),
    # pipeline 2x2, pipeline.zero 0/1/2 (RevCol-T: RevCol-S's pipeline is held at 2x1, its ZeRO-3 at 1-2 ranks)
    (4, ["revcol_tiny:0", "revcol_tiny:3", "revcol_tiny:0:p2", "revcol_tiny:1:p2", "revcol_tiny:2:p2"]),
])
def test_model_state_figures_match_measured_within_15_percent(tmp_path, world, configs):
    out = tmp_path / "measured.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                        "--master_port", str(free_port()), "-m", "revcol_dist.plan.measure", str(out), *configs],
                       capture_output=True, text=True, env=env(), timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [f"{x['model']}:{x['zero']}" + (f":p{x['stages']}" if x["stages"] > 1 else "") for x in rows] == configs
    for x in rows:
        ratio = x["predicted"] / x["measured"]
        assert 0.85 <= ratio <= 1.15, x
    if world == 4:  # not trivially equal figures: ZeRO-3 shards, ZeRO-0 replicates; so does pipeline.zero
        assert rows[1]["measured"] < 0.6 * rows[0]["measured"]
        assert rows[4]["measured"] < rows[3]["measured"] < 0.7 * rows[2]["measured"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["revcol_tiny", "revcol_small"])
@pytest.mark.parametrize("res", [128, 224])
def test_activation_figures_match_measured_within_15_percent(name, res):
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000)
    for p in model.parameters():  # gradients allocated up front: the meter then sees activations only
        p.grad = torch.zeros_like(p)
    x = torch.randn(2, 3, res, res)
    with LiveBytes() as meter:
        model(x).logits.logsumexp(1).mean().backward()
    b = make_plan(PlanInput(model=name, nodes=1, gpus_per_node=1, zero=0, batch=2, res=res, precision="fp32",
                            inter_supv=False))["bytes_per_gpu"]
    act = (b["kept_boundaries"] + max(b["recompute_transient_peak"], b["plain_columns"]) + b["kept_levels"]
           + b["stem_and_input"] + b["weight_gradient_transient"])
    assert 0.85 <= act / meter.peak <= 1.15, (act, meter.peak)


@pytest.mark.launches
def test_huge_plan_counts_and_cli():
    r = subprocess.run([sys.executable, "-m", "revcol_dist.plan", "--model", "revcol_huge", "--nodes", "8",
                        "--gpus-per-node", "8", "--gpu-mem", "80", "--zero", "3", "--batch", "8", "--res", "224",
                        "--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["params_total"] == 2_199_107_704  # REFERENCE.md: RevCol-H, 1K training with inter_supv
    b = plan["bytes_per_gpu"]
    psi = plan["params_total"]
    assert b["parameters"] == pytest.approx(2 * psi / 64 + 2 * plan_persistent(), rel=1e-6)
    assert b["optimizer"] == pytest.approx(12 * psi / 64, abs=1)
    assert plan["comm_bytes_per_step"] == pytest.approx(6 * psi * 63 / 64, abs=1)
    assert plan["fits"] and plan["largest_micro_batch"] >= 8
    # ZeRO-0 cannot hold 2.2B parameters in 24 GiB: 16 bytes of states each
    r0 = subprocess.run([sys.executable, "-m", "revcol_dist.plan", "--model", "revcol_huge", "--zero", "0", "--json",
                         "--gpu-mem", "24"],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert json.loads(r0.stdout)["fits"] is False
    bad = subprocess.run([sys.executable, "-m", "revcol_dist.plan", "--zero", "3", "--pipeline", "2"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "up to ZeRO-2" in bad.stderr


def plan_persistent():
    with torch.device("meta"):
        m = create_model("revcol_huge", num_classes=1000, inter_supv=True)
    return sum(p.numel() for p in m.parameters() if p.numel() < 100_000)


def test_pipeline_partition_balances_columns():
    p = make_plan(PlanInput(model="revcol_base", nodes=1, gpus_per_node=4, zero=1, pipeline=4, batch=4))
    assert [len(g) for g in p["stage_columns"]] == [4, 4, 4, 4]  # 16 equal columns
    assert sorted(i for g in p["stage_columns"] for i in g) == list(range(16))


@pytest.mark.parametrize("name,res,published", [
    ("revcol_tiny", 224, 4.5), ("revcol_small", 224, 9.0), ("revcol_base", 224, 16.6), ("revcol_large", 224, 39.0),
    ("revcol_base", 384, 48.9), ("revcol_large", 384, 116.0), ("revcol_huge", 640, 2537.0)])
def test_forward_macs_match_the_published_flops(name, res, published):
    from revcol_dist.models import get_variant
    from revcol_dist.models.flops import forward_macs

    assert forward_macs(get_variant(name), res) / 1e9 == pytest.approx(published, rel=0.01)


@pytest.mark.launches
def test_throughput_comes_from_the_measured_row_or_says_it_is_assumed():
    """A plan of the measured configuration gives back the measured images/s (an MFU derived
    against the planner's own FLOPs, not assumed); another batch or world keeps that MFU; a
    GPU or model without a row assumes 35% and says so; --mfu is taken as given."""
    from revcol_dist.plan.speed import TABLE, measured_rows

    row = next(r for r in measured_rows() if r["model"] == "revcol_base" and r["gpu"] == "H200")
    same = make_plan(PlanInput(model="revcol_base", gpus_per_node=1, zero=0, batch=row["batch"], res=row["res"],
                               precision=row["precision"], gpu="h200", gpu_tflops=989.0))
    assert same["throughput_basis"]["kind"] == "measured"
    assert same["images_per_sec_per_gpu"] == pytest.approx(row["images_per_sec"], rel=1e-9)
    wider = make_plan(PlanInput(model="revcol_base", nodes=2, gpus_per_node=8, zero=2, batch=32, res=row["res"],
                                precision=row["precision"], gpu="H200", gpu_tflops=989.0))
    assert wider["throughput_basis"]["mfu"] == pytest.approx(same["throughput_basis"]["mfu"])
    assumed = make_plan(PlanInput(model="revcol_huge", gpu="H200"))
    assert assumed["throughput_basis"]["kind"] == "assumed" and "ASSUMED" in assumed["throughput_basis"]["note"]
    assert assumed["throughput_basis"]["mfu"] == 0.35
    given = make_plan(PlanInput(model="revcol_base", gpu="H200", mfu=0.5))
    assert given["throughput_basis"] == {"kind": "given", "mfu": 0.5, "note": "MFU 50.0% as given (--mfu)"}
    r = subprocess.run([sys.executable, "-m", "revcol_dist.plan", "--model", "revcol_base", "--gpus-per-node", "1",
                        "--zero", "0", "--batch", "128", "--gpu", "H200"], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0 and f"{row['images_per_sec']:.0f} img/s per GPU" in r.stdout, r.stdout
    assert f"measured: {row['images_per_sec']:g} img/s" in r.stdout and TABLE.is_file()
