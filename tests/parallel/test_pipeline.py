"""Column pipeline: the schedule and partition as functions, and the engine as real gloo
processes (2 stages x 1, 3 stages, 2 stages x 2 replicas) against the same model in one
process with plain autograd."""

import json
import subprocess
import sys

import pytest

from revcol_dist.models import create_model
from revcol_dist.parallel.pipeline import bubble_fraction, column_costs, one_f_one_b, partition_table, split_columns
from revcol_dist.parallel.pipeline.schedule import max_in_flight

from .launch_helpers import (LAUNCHER, REPO, assert_ok, env, free_port, launch_runs, losses, run_torchrun,
                             weights, worst_relative, write_config)

WORKER = str(REPO / "tests" / "parallel" / "pipeline_worker.py")


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("micro", [1, 2, 3, 8])
def test_one_f_one_b_order(stages, micro):
    for s in range(stages):
        acts = one_f_one_b(s, stages, micro)
        assert sorted(acts) == sorted([("F", m) for m in range(micro)] + [("B", m) for m in range(micro)])
        assert [m for k, m in acts if k == "F"] == list(range(micro))
        assert [m for k, m in acts if k == "B"] == list(range(micro))
        assert all(acts.index(("F", m)) < acts.index(("B", m)) for m in range(micro))
        # bounded by the stages after this one, not by the number of micro-batches
        assert max_in_flight(s, stages, micro) == min(stages - s, micro)
    assert one_f_one_b(stages - 1, stages, micro)[:2] == [("F", 0), ("B", 0)]


def test_bubble_formula():
    assert bubble_fraction(1, 8) == 0.0
    assert bubble_fraction(2, 2) == pytest.approx(1 / 3)
    assert bubble_fraction(4, 16) == pytest.approx(3 / 19)


def test_partition_by_params_and_flops():
    model = create_model("revcol_small", num_classes=10, inter_supv=True)
    by_params = column_costs(model, "params")
    assert sum(by_params) == sum(p.numel() for p in model.parameters())  # every parameter counted once
    flops = column_costs(model, "flops", res=64)
    assert all(f > 0 for f in flops) and len(flops) == 8
    groups, costs_back = split_columns(model, 4, "flops", res=64)
    assert costs_back == flops
    assert [c for g in groups for c in g] == list(range(8)) and all(groups)
    costs = [sum(flops[c] for c in g) for g in groups]
    assert max(costs) <= 1.35 * sum(flops) / 4  # balanced up to one column's granularity
    text = partition_table(groups, flops, "flops")
    assert "stage 0: columns 0-" in text and "+ stem" in text and "final head" in text.splitlines()[-1]
    with pytest.raises(ValueError, match="1 to 8 stages"):
        split_columns(model, 9)
    with pytest.raises(ValueError, match="'params' or 'flops'"):
        column_costs(model, "bytes")


def _run(tmp_path, nproc, *args):
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), WORKER,
                        "--out", str(out), *args],
                       capture_output=True, text=True, env=env(), timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(nproc)]
    return r, ranks


def _check(ranks, tol):
    for rk in ranks:
        assert rk["params_all_stages"] == rk["params_model"]  # every parameter lives on exactly one stage
        assert rk["header_keys"] == 1  # two steps of equal micro-batches: one header per stage boundary
        assert rk["timing"]["step_s"] >= rk["timing"]["wait_s"] >= 0.0
        for st in rk["steps"]:  # step 1 is the first step; step 2 starts from updated weights
            assert abs(st["loss"] - st["loss_ref"]) <= tol * abs(st["loss_ref"]), st
            assert st["worst_grad_rel"] <= tol, st
            assert st["params_compared"] > 0



@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-10)])
def test_two_stages_match_single_process(tmp_path, dtype, tol):
    r, ranks = _run(tmp_path, 2, "--stages", "2", "--micro", "4", *(["--float64"] if dtype == "float64" else []))
    assert "pipeline partition by params (2 stages)" in r.stdout and "stage 1: columns 2-3" in r.stdout
    assert [rk["columns"] for rk in ranks] == [[0, 1], [2, 3]]
    _check(ranks, tol)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_middle_stage_heads_contribute(tmp_path):
    """3 stages over 4 columns: the middle stage holds heads of its own columns."""
    _, ranks = _run(tmp_path, 3, "--stages", "3", "--micro", "3", "--cost", "flops")
    assert len(ranks[1]["columns"]) >= 1 and ranks[1]["columns"][0] > 0 and ranks[1]["columns"][-1] < 3
    _check(ranks, 1e-5)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_stages_two_replicas(tmp_path):
    """With pipeline.zero=2: each replica keeps the gradients it owns, the replicas' mean, reduced
    from inside the last micro-batch's backward (the reversible engine's hooks fire)."""
    _, ranks = _run(tmp_path, 4, "--stages", "2", "--micro", "2", "--zero", "2")
    assert [(rk["stage"], rk["replica"]) for rk in ranks] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    _check(ranks, 1e-5)
    for rk in ranks:
        assert all(st["overlapped"] == 2 for st in rk["steps"]), rk["steps"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero_stash_exact_in_float64_and_guarded(tmp_path):
    """Stages keep no outputs; the next stage sends them back reconstructed. Step 1 checks
    (outputs kept and compared: the drift), step 2 runs without them."""
    _, ranks = _run(tmp_path, 4, "--stages", "2", "--micro", "2", "--zero-stash", "--float64")
    _check(ranks, 1e-10)
    assert all(rk["steps"][1]["zero_stash"] for rk in ranks)
    assert 0 < ranks[0]["steps"][0]["drift"] < 1e-12


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero_stash_falls_back_when_drift_is_too_large(tmp_path):
    r, ranks = _run(tmp_path, 2, "--stages", "2", "--micro", "2", "--zero-stash", "--drift-tolerance", "1e-12")
    assert "zero-stash off" in r.stdout
    assert all(not rk["steps"][0]["zero_stash"] for rk in ranks)  # switched off after the check
    assert ranks[0]["steps"][0]["drift"] > 1e-12
    _check(ranks, 1e-5)  # the check step kept its outputs; step 2 ran with them


# ---- the training loop on the pipeline (launchers/pretrain.py) ------------------------

PIPE = ["--set", "pipeline.stages=2", "--set", "pipeline.micro_batches=2"]  # EMA on (the test config's 0.5)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe_train")
    data_root = tmp / "digits"
    from revcol_dist.data.digits import prepare_digits

    prepare_digits(data_root)
    return tmp, data_root


# The uninterrupted runs: name -> (ranks, write_config's settings, arguments); those of one rank
# count share a launch (scenario_worker.py)
PIPE_RUNS = {"ref": (1, {"steps": 4}, []), "pipe2": (2, {"steps": 4}, PIPE), "pipe4": (4, {"steps": 4}, PIPE),
             "pipe_full": (2, {"steps": 6, "every": 3}, PIPE)}


@pytest.fixture(scope="module")
def pipe_runs(digits):
    """Every run of PIPE_RUNS, in one launch per rank count: name -> RunOutput."""
    tmp, data_root = digits
    return launch_runs(tmp, data_root, PIPE_RUNS, "pipe_runs")


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_pretrain_launcher_on_the_pipeline(digits, pipe_runs, nproc):
    """2 stages x 1 and x 2 replicas train the same global batches to the same weights as one
    process; the export holds every stage's weights; evaluation runs through the stages."""
    tmp, data_root = digits
    assert_ok(pipe_runs["ref"])
    assert_ok(pipe_runs[f"pipe{nproc}"])
    assert "pipeline partition by params (2 stages)" in pipe_runs[f"pipe{nproc}"].stdout
    a, b = losses(tmp / "ref"), losses(tmp / f"pipe{nproc}")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert all(abs(a[s] - b[s]) <= 1e-5 * abs(a[s]) for s in a), (a, b)
    wa, wb = weights(tmp / "ref"), weights(tmp / f"pipe{nproc}")
    assert worst_relative(wa, wb) < 1e-4
    # each stage averages its own weights; the export gathers them
    assert worst_relative(weights(tmp / "ref", "state_dict_ema"), weights(tmp / f"pipe{nproc}", "state_dict_ema")) < 1e-4
    ma = json.loads((tmp / "ref" / "metrics.json").read_text())
    mb = json.loads((tmp / f"pipe{nproc}" / "metrics.json").read_text())
    assert mb["backend"] == f"pipeline2x{nproc // 2}"
    assert abs(ma["val_top1"] - mb["val_top1"]) <= 0.5  # same weights up to rounding: same predictions, nearly
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp / f"pipe{nproc}" / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"1_overview/1_train_loss", "1_overview/2_val_top1", "2_val/top1_ema", "6_health/alpha_min"} <= tags
    for level, channels in enumerate([8, 16, 24, 32]):  # every stage's alphas reach rank 0's histograms
        assert ea.Histograms(f"7_alpha/level_{level}")[-1].histogram_value.num == 4 * channels


@pytest.mark.multiprocess
@pytest.mark.slow
def test_pipeline_run_resumes_after_a_dead_rank(digits, pipe_runs):
    tmp, data_root = digits
    assert_ok(pipe_runs["pipe_full"])
    cfg = write_config(tmp, "pipe_killed", data_root, steps=6, every=3)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), LAUNCHER,
                        "--config", str(cfg), *PIPE],
                       capture_output=True, text=True, env=dict(env(), REVCOL_FAULT_STEP="4"), timeout=600, cwd=REPO)
    assert r.returncode != 0 and "exitcode: 13" in r.stderr
    r = run_torchrun(cfg, 2, *PIPE, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step 3" in r.stdout
    assert losses(tmp / "pipe_killed") == losses(tmp / "pipe_full")  # bit-identical continuation
    assert worst_relative(weights(tmp / "pipe_killed"), weights(tmp / "pipe_full")) == 0.0
    assert worst_relative(weights(tmp / "pipe_killed", "state_dict_ema"), weights(tmp / "pipe_full", "state_dict_ema")) == 0.0


@pytest.mark.multiprocess
@pytest.mark.slow
def test_pipeline_bad_input(digits):
    tmp, data_root = digits
    cfg = write_config(tmp, "pipe_bad", data_root, steps=2)
    r = run_torchrun(cfg, 2, "--set", "pipeline.stages=3")
    assert r.returncode != 0 and "does not divide the world size 2" in r.stderr
    r = run_torchrun(cfg, 2, *PIPE, "--set", "pipeline.micro_batches=3")
    assert r.returncode != 0 and "micro-batches" in r.stderr
    r = run_torchrun(cfg, 2, *PIPE, "--deepspeed_config", str(REPO / "ds_configs" / "zero2.json"))
    assert r.returncode != 0 and "drop --deepspeed_config" in r.stderr
