"""The failures long runs on shared clusters meet, as real processes: a damaged checkpoint, a
full disk (a file-size limit stands in for it), a hung rank, and a kill during an
asynchronous save. Each ends where an uninterrupted run ends, or with a one-line error."""

import json
import subprocess
import sys
import time

import pytest
import torch

from tests.parallel.launch_helpers import (LAUNCHER, REPO, env, free_port, kill_once_logged, losses, run_single,
                                           weights, worst_relative, write_config)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
VERIFY = str(REPO / "launchers" / "verify_checkpoint.py")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failures")
    data_root = tmp / "digits"
    from revcol_dist.data.digits import prepare_digits

    prepare_digits(data_root)
    ref = write_config(tmp, "uninterrupted", data_root, steps=8, every=2)
    r = run_single(ref)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, data_root, tmp / "uninterrupted"


def _one_line_error(r) -> str:
    assert r.returncode != 0
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    return errors[0]


def _same_run(a, b):
    assert losses(a) == losses(b)
    assert worst_relative(weights(a), weights(b)) == 0.0
    assert worst_relative(weights(a, "state_dict_ema"), weights(b, "state_dict_ema")) == 0.0


def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(work):
    tmp, data_root, ref = work
    cfg = write_config(tmp, "damaged", data_root, steps=8, every=2)
    out = tmp / "damaged"
    assert run_single(cfg, "--set", "train.keep_checkpoints=3").returncode == 0
    ck = out / "checkpoints"
    newest = ck / "step_00000008"
    # bit rot or a network file system after the rename: a truncated file ...
    victim = newest / "model_optim.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    v = subprocess.run([sys.executable, VERIFY, str(newest), str(ck / "step_00000006")], capture_output=True,
                       text=True, cwd=REPO)
    assert v.returncode == 1 and "step_00000008: damaged: model_optim.pt has 1000 bytes" in v.stdout, v.stdout
    assert "step_00000006: intact" in v.stdout
    line = _one_line_error(run_single(cfg, "--resume", str(newest)))
    assert "is damaged: model_optim.pt has 1000 bytes" in line and "--resume auto" in line
    r = run_single(cfg, "--resume", "auto", "--set", "train.keep_checkpoints=3")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [l for l in r.stdout.splitlines() if l.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and "step_00000008 is damaged (model_optim.pt" in warnings[0], r.stdout
    assert "resumed from" in r.stdout and "step 6" in r.stdout
    _same_run(out, ref)
    # ... or one flipped byte in another file of the (rewritten) newest checkpoint
    client = newest / "client_rank00000.pt"
    data = bytearray(client.read_bytes())
    data[len(data) // 2] ^= 0x01
    client.write_bytes(bytes(data))
    r = run_single(cfg, "--resume", "auto", "--set", "train.keep_checkpoints=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "client_rank00000.pt does not match its checksum" in r.stdout and "step 6" in r.stdout
    _same_run(out, ref)


def test_a_save_that_does_not_fit_is_a_one_line_error_or_a_warning(work):
    tmp, data_root, ref = work
    limit = ["--set", "train.keep_checkpoints=5"]
    faulty = dict(env(), REVCOL_FSIZE_LIMIT="4:200000")  # a 200 kB file-size limit while step 4 is saved
    cfg = write_config(tmp, "full_disk", data_root, steps=6, every=2)
    r = subprocess.run([sys.executable, LAUNCHER, "--config", str(cfg), *limit], capture_output=True, text=True,
                       env=faulty, timeout=600, cwd=REPO)
    line = _one_line_error(r)
    assert "checkpoint step_00000004 was not saved" in line and "model_optim.pt failed" in line, line
    assert "File too large" in line and "ulimit -f" in line and " are free" in line, line
    assert "it needs about" in line and "the last checkpoint's size" in line, line
    assert "the previous checkpoint" in line and "step_00000002 is intact" in line, line
    ck = tmp / "full_disk" / "checkpoints"
    assert [d.name for d in ck.iterdir()] == ["step_00000002"]  # the failed save's folder is gone
    assert subprocess.run([sys.executable, VERIFY, str(ck / "step_00000002")], cwd=REPO).returncode == 0
    # on_save_error=continue: a warning, training goes on, the next save (limit lifted) succeeds
    cfg = write_config(tmp, "full_disk_continue", data_root, steps=6, every=2)
    r = subprocess.run([sys.executable, LAUNCHER, "--config", str(cfg), *limit, "--set", "train.on_save_error=continue"],
                       capture_output=True, text=True, env=faulty, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: checkpoint step_00000004 was not saved" in r.stdout and "training goes on" in r.stdout
    ck = tmp / "full_disk_continue" / "checkpoints"
    assert sorted(d.name for d in ck.iterdir()) == ["step_00000002", "step_00000006"]
    went_on, stopped = losses(tmp / "full_disk_continue"), losses(tmp / "full_disk")
    assert sorted(went_on) == list(range(1, 7)) and sorted(stopped) == [1, 2, 3, 4]
    assert all(went_on[s] == stopped[s] for s in stopped)  # a failed save changes nothing of the run


def _torchrun(cfg, *extra, restarts=0, fault_env=None, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    cmd += ["--max-restarts", str(restarts)] if restarts else []
    return subprocess.run(cmd + [LAUNCHER, "--config", str(cfg), *extra], capture_output=True, text=True,
                          env=dict(env(), **(fault_env or {})), timeout=timeout, cwd=REPO)


def test_a_hung_rank_is_named_and_the_job_restarts(work):
    tmp, data_root, _ = work
    hang = {"REVCOL_HANG_STEP": "3"}  # the last rank sleeps before step 3's first collective (first attempt only)
    ref = write_config(tmp, "hung_ref", data_root, steps=6, every=2)
    assert _torchrun(ref).returncode == 0
    # one launch: the hang is detected, named and dumped, and under torchrun --max-restarts the job
    # resumes from the last checkpoint and ends as if nothing happened
    cfg = write_config(tmp, "hung_restarted", data_root, steps=6, every=2)
    t0 = time.time()
    r = _torchrun(cfg, "--set", "train.hang_timeout_s=10", "--resume", "auto", restarts=1, fault_env=hang)
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    # two start-ups, the timeout, the dump, six steps: not the 600 s process-group timeout
    assert elapsed < 10 + 120, elapsed
    log = r.stdout + r.stderr
    assert "stuck rank(s) 1: did not reach step 3's first collective" in log, log[-4000:]
    for rank in (0, 1):
        assert f"Python stacks of rank {rank}" in log
        saved = (tmp / "hung_restarted" / f"hang_rank{rank:05d}.log").read_text()
        assert "at step" in saved and "File " in saved and "stuck rank(s) 1" in saved
    assert "_maybe_hang" in (tmp / "hung_restarted" / "hang_rank00001.log").read_text()  # where rank 1 was stuck
    assert "resumed from" in r.stdout and "step 2" in r.stdout
    _same_run(tmp / "hung_restarted", tmp / "hung_ref")


def test_asynchronous_checkpoints_equal_synchronous_ones_and_survive_a_kill(work):
    tmp, data_root, ref = work
    cfg = write_config(tmp, "async", data_root, steps=8, every=2)
    r = run_single(cfg, "--set", "train.async_checkpoint=true")
    assert r.returncode == 0, r.stderr[-3000:]
    _same_run(tmp / "async", ref)
    for step in ("step_00000006", "step_00000008"):
        a, b = ref / "checkpoints" / step, tmp / "async" / "checkpoints" / step
        ma, mb = json.loads((a / "complete.json").read_text()), json.loads((b / "complete.json").read_text())
        assert ma["files"].keys() == mb["files"].keys() and ma["step"] == mb["step"]
        assert any(name.startswith("portable/") for name in ma["files"])  # the layout-free form, recorded
        for name in ma["files"]:
            if name.endswith(".pt"):
                sa, sb = (torch.load(d / name, weights_only=True) for d in (a, b))
                assert _equal(sa, sb), (step, name)
            else:  # safetensors shards and the index, written in the background: the same bytes
                assert (a / name).read_bytes() == (b / name).read_bytes(), (step, name)
    # a SIGKILL while the step-4 checkpoint is written in the background: step 2 stays the newest
    cfg = write_config(tmp, "async_killed", data_root, steps=8, every=2)
    out = tmp / "async_killed"
    kill_once_logged([sys.executable, LAUNCHER, "--config", str(cfg), "--set", "train.async_checkpoint=true"], out, 5,
                     extra_env={"REVCOL_SLOW_SAVE": "4:60"})  # training went on past the save: step 5 logged
    ck = out / "checkpoints"
    assert (ck / ".tmp_step_00000004").is_dir() and not (ck / "step_00000004").exists()
    assert [d.name for d in ck.glob("step_*")] == ["step_00000002"]
    r = run_single(cfg, "--resume", "auto", "--set", "train.async_checkpoint=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step 2" in r.stdout
    _same_run(out, ref)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b
