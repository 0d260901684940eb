"""launchers/pretrain.py across backends, as real processes on gloo: every mode trains the
same global batches to the same weights; a SIGKILLed run resumes exactly; bad input gets a
one-line error. The uninterrupted runs the tests compare with share two launches (one process,
two ranks; scenario_worker.py), so each is also a run after others in the same process: the
bitwise comparisons (two nodes, SIGKILL, restarts) hold across that too."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .launch_helpers import (LAUNCHER, REPO, assert_ok, env, free_port, kill_once_logged, launch_runs, losses,
                             run_single, run_torchrun, weights, worst_relative, write_config)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


ZERO = {stage: ["--deepspeed_config", str(REPO / "ds_configs" / f"{stage}.json")]
        for stage in ("zero1", "zero2", "zero3", "zero3_offload")}
BACKEND_MODES = ["ddp", "zero1", "zero2", "zero3", "zero3_offload", "single_accum4", "ddp_accum4", "zero2_accum4",
                 "zero3_accum4"]


def _backend_run(mode):
    backend, _, accum = mode.partition("_accum")
    extra = ZERO.get(backend, []) + (["--set", f"train.grad_accum={accum}"] if accum else [])
    if mode == "zero3_accum4":  # and the final checkpoint written in the background: the export reads it
        extra += ["--set", "train.async_checkpoint=true"]
    return 1 if backend == "single" else 2, {}, extra


# The uninterrupted runs the tests compare with: name -> (ranks, write_config's settings, arguments)
SHARED_RUNS = {"single": (1, {}, []), **{mode: _backend_run(mode) for mode in BACKEND_MODES},
               "uninterrupted": (1, {"steps": 8, "every": 2}, []), "partial": (1, {"steps": 4, "every": 2}, []),
               "adam_single": (1, {"optimizer": "adamw"}, []), "adam_zero2": (2, {"optimizer": "adamw"}, ZERO["zero2"]),
               "restart_ref_ddp": (2, {"steps": 8, "every": 2}, []),
               "restart_ref_zero2": (2, {"steps": 8, "every": 2}, ZERO["zero2"]), "one_node": (2, {}, [])}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The digits, and every run of SHARED_RUNS: those of one rank count share a launch
    (scenario_worker.py), each run's exit and output checked by the test that reads it;
    (folder, data, the single-process reference's folder, name -> RunOutput)."""
    tmp = tmp_path_factory.mktemp("launch")
    data_root = tmp / "digits"
    from revcol_dist.data.digits import prepare_digits

    prepare_digits(data_root)
    runs = launch_runs(tmp, data_root, SHARED_RUNS, "shared")
    assert_ok(runs["single"])
    return tmp, data_root, tmp / "single", runs


@pytest.mark.parametrize("mode", BACKEND_MODES)
def test_backends_match_single_process(work, mode):
    """Every backend, and train.grad_accum=4 (the same global batch in 4 micro-batches per rank,
    one optimizer step) on each, follows the single-process run."""
    tmp, data_root, ref, runs = work
    backend = mode.partition("_accum")[0]
    assert_ok(runs[mode])
    got = json.loads((tmp / mode / "metrics.json").read_text())
    assert got["backend"] == (backend if backend in ("single", "ddp") else f"zero{backend[4]}")
    assert got["world_size"] == (1 if backend == "single" else 2)
    l_ref, l_got = losses(ref), losses(tmp / mode)
    assert l_ref.keys() == l_got.keys() == {1, 2, 3}
    for s in l_ref:
        assert abs(l_ref[s] - l_got[s]) <= 1e-5 * abs(l_ref[s]), (s, l_ref[s], l_got[s])
    assert worst_relative(weights(ref), weights(tmp / mode)) < 1e-5
    assert worst_relative(weights(ref, "state_dict_ema"), weights(tmp / mode, "state_dict_ema")) < 1e-5
    # the EMA weights really differ from the live ones (decay 0.5 over 3 steps)
    assert worst_relative(weights(ref), weights(ref, "state_dict_ema")) > 1e-3
    ref_metrics = json.loads((ref / "metrics.json").read_text())
    assert abs(got["val_ema_top1"] - ref_metrics["val_ema_top1"]) < 0.3  # evaluation with EMA swapped in


def test_two_nodes_match_one_node(work):
    tmp, data_root, _, runs = work
    assert_ok(runs["one_node"])
    two = write_config(tmp, "two_nodes", data_root)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               LAUNCHER, "--config", str(two)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    assert losses(tmp / "one_node") == losses(tmp / "two_nodes")
    assert worst_relative(weights(tmp / "one_node"), weights(tmp / "two_nodes")) == 0.0


def test_sigkill_then_resume_auto_continues_exactly(work):
    tmp, data_root, _, runs = work
    assert_ok(runs["uninterrupted"])
    cfg = write_config(tmp, "killed", data_root, steps=8, every=2)
    out = tmp / "killed"
    p = kill_once_logged([sys.executable, LAUNCHER, "--config", str(cfg)], out, 5)  # checkpoint at 4 committed
    assert p.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "step_00000004" / "complete.json").exists()
    assert not (out / "metrics.json").exists()
    r = run_single(cfg, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step 4" in r.stdout
    assert losses(out) == losses(tmp / "uninterrupted")  # bit-identical trajectory
    assert worst_relative(weights(out), weights(tmp / "uninterrupted")) == 0.0
    assert worst_relative(weights(out, "state_dict_ema"), weights(tmp / "uninterrupted", "state_dict_ema")) == 0.0


def test_crash_mid_checkpoint_leaves_previous_usable(work):
    tmp, data_root, _, runs = work
    assert_ok(runs["partial"])
    cfg = tmp / "partial.yaml"
    ck = tmp / "partial" / "checkpoints"
    # a half-written next checkpoint, as a crash during save leaves it
    (ck / ".tmp_step_00000006").mkdir()
    (ck / ".tmp_step_00000006" / "model_optim.pt").write_bytes(b"truncated")
    from revcol_dist.engine.checkpoint import CheckpointManager

    assert CheckpointManager(ck, 0, 1).latest().name == "step_00000004"
    r = run_single(cfg, "--resume", "auto", "--set", "train.max_steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step_00000004" in r.stdout
    assert not (ck / ".tmp_step_00000006").exists()


def _one_line_error(r):
    assert r.returncode != 0
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert errors, r.stderr[-2000:]
    return errors[0]


def test_bad_input_one_line_errors(work, tmp_path):
    tmp, data_root, ref, _ = work
    cfg = write_config(tmp, "bad", data_root)
    line = _one_line_error(run_single(cfg, "--set", "train.lrr=1"))
    assert "unknown config key 'train.lrr'" in line
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 1}}))
    line = _one_line_error(run_single(cfg, "--deepspeed_config", str(ds)))
    assert "train_batch_size=64" in line and "train.batch_size=8" in line
    other = write_config(tmp, "other_variant", data_root)
    (tmp / "other_variant").mkdir(exist_ok=True)
    os.symlink(ref / "checkpoints", tmp / "other_variant" / "checkpoints")
    line = _one_line_error(run_single(other, "--resume", "auto", "--set", "model.args.channels=[8,16,24,40]"))
    assert "checkpoint of revcol_tiny" in line and "channels" in line
    r = run_torchrun(cfg, 3)
    assert r.returncode != 0
    assert "train.batch_size=8 is not divisible by the world size 3" in r.stderr


def test_adamw_zero2_matches_single_process_losses(work):
    tmp, data_root, _, runs = work
    assert_ok(runs["adam_single"])
    assert_ok(runs["adam_zero2"])
    a, b = losses(tmp / "adam_single"), losses(tmp / "adam_zero2")
    assert all(abs(a[s] - b[s]) <= 1e-5 * abs(a[s]) for s in a)
    # Adam moves parameters whose gradient is rounding noise by a full step either way:
    # weights agree to 1e-4 here, not bit for bit (see the SGD test for the strict check).
    assert worst_relative(weights(tmp / "adam_single"), weights(tmp / "adam_zero2")) < 1e-4


@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_torchrun_max_restarts_resumes_after_a_dead_rank(work, mode):
    """The last rank dies (exit 13) after step 5; torchrun restarts the group, which resumes from
    the step-4 checkpoint and ends on the uninterrupted trajectory."""
    tmp, data_root, _, runs = work
    assert_ok(runs[f"restart_ref_{mode}"])
    extra = ZERO.get(mode, [])
    cfg = write_config(tmp, f"restarted_{mode}", data_root, steps=8, every=2)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                        "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                        LAUNCHER, "--config", str(cfg), "--resume", "auto", *extra],
                       capture_output=True, text=True, env=dict(env(), REVCOL_FAULT_STEP="5"), timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exitcode: 13" in r.stderr  # the rank really died
    assert "resumed from" in r.stdout and "step 4" in r.stdout
    assert losses(tmp / f"restarted_{mode}") == losses(tmp / f"restart_ref_{mode}")
    assert worst_relative(weights(tmp / f"restarted_{mode}"), weights(tmp / f"restart_ref_{mode}")) == 0.0


def test_the_projects_own_command_reaches_97_percent(tmp_path):
    """`deepspeed --num_gpus 2 launchers/pretrain.py --deepspeed_config ds_configs/zero3.json`, as
    the project describes it: no --config (the main job's configs/default.yaml), ZeRO-3."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    out = tmp_path / "zero3_default"
    r = subprocess.run([str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), LAUNCHER,
                        "--deepspeed_config", "ds_configs/zero3.json", "--set", f"output_dir={out}"],
                       capture_output=True, text=True, env=env(), timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == "zero3" and metrics["world_size"] == 2
    assert metrics["val_top1"] >= 97.0, metrics
