"""ZeRO-Infinity (ds_configs/zero3_nvme.json): optimizer states and parameters on NVMe train to
the same weights as in-memory ZeRO-3, on 2 gloo ranks. Needs libaio (the async_io op is built
on first use, a few minutes; cached under TORCH_EXTENSIONS_DIR). The uninterrupted runs share
one launch."""

import json
import subprocess
import sys

import pytest

from .launch_helpers import (LAUNCHER, REPO, assert_ok, env, free_port, launch_runs, losses, run_torchrun,
                             weights, worst_relative, write_config)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

BIGGER = ["--set", "model.args.channels=[64,128,256,512]", "--set", "model.args.num_columns=2",
          "--set", "train.ema_decay=0"]  # the EMA follows resident partitions only (refused with NVMe)


def _async_io_builds() -> bool:
    r = subprocess.run([sys.executable, "-c", "from deepspeed.ops.op_builder import AsyncIOBuilder as B; "
                        "b = B(); assert b.is_compatible(verbose=False); b.load()"],
                       capture_output=True, text=True, timeout=1500, env=env())
    return r.returncode == 0


@pytest.fixture(scope="module")
def aio():
    if not _async_io_builds():
        pytest.skip("DeepSpeed's async_io op does not build here (apt-get install libaio-dev)")


def _nvme_config(tmp_path, name):
    nvme = tmp_path / f"nvme_{name}"
    nvme.mkdir()
    ds = json.loads((REPO / "ds_configs" / "zero3_nvme.json").read_text())
    for part in ("offload_optimizer", "offload_param"):
        ds["zero_optimization"][part]["nvme_path"] = str(nvme)
        ds["zero_optimization"][part]["pin_memory"] = False
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.fixture(scope="module")
def runs(aio, tmp_path_factory):
    """The uninterrupted runs, in one launch of 2 ranks (scenario_worker.py): in-memory ZeRO-3,
    the same on NVMe, and a 6-step AdamW run on NVMe that the resume test continues."""
    tmp = tmp_path_factory.mktemp("zero_infinity")
    data_root = tmp / "digits"
    from revcol_dist.data.digits import prepare_digits

    prepare_digits(data_root)
    runs = {"zero3": (2, {}, ["--deepspeed_config", REPO / "ds_configs" / "zero3.json", *BIGGER]),
            "zero3_nvme": (2, {}, ["--deepspeed_config", _nvme_config(tmp, "zero3_nvme"), *BIGGER]),
            "full": (2, {"steps": 6, "every": 3, "optimizer": "adamw"},
                     ["--deepspeed_config", _nvme_config(tmp, "full"), *BIGGER])}
    return tmp, data_root, launch_runs(tmp, data_root, runs, "zero_infinity")


def test_nvme_offload_matches_in_memory_zero3(runs):
    tmp, data_root, done = runs
    assert_ok(done["zero3"])
    assert_ok(done["zero3_nvme"])
    swap = [f for f in (tmp / "nvme_zero3_nvme").rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in swap) > 2**20, "nothing was swapped to the NVMe path"
    a, b = losses(tmp / "zero3"), losses(tmp / "zero3_nvme")
    with_ema = run_torchrun(tmp / "zero3_nvme.yaml", 2, "--deepspeed_config", str(tmp / "zero3_nvme.json"), *BIGGER[:-2],
                            "--set", "train.ema_decay=0.5")
    assert with_ema.returncode != 0 and "offloads parameters to NVMe" in with_ema.stderr
    assert a.keys() == b.keys() == {1, 2, 3}
    assert all(abs(a[s] - b[s]) <= 1e-5 * abs(a[s]) for s in a)
    assert worst_relative(weights(tmp / "zero3"), weights(tmp / "zero3_nvme")) < 1e-5


def test_nvme_checkpoint_resumes_exactly(runs, tmp_path):
    """DeepSpeed copies the NVMe swap files into the checkpoint (offloaded_tensors/) and back on
    load; the resumed run must continue on the uninterrupted trajectory, Adam moments included."""
    tmp, data_root, done = runs
    assert_ok(done["full"])
    part = write_config(tmp_path, "part", data_root, steps=6, every=3, optimizer="adamw")
    ds_part = _nvme_config(tmp_path, "part")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), LAUNCHER,
                        "--config", str(part), "--deepspeed_config", str(ds_part), *BIGGER],
                       capture_output=True, text=True, env=dict(env(), REVCOL_FAULT_STEP="4"), timeout=1200, cwd=REPO)
    assert r.returncode != 0 and "exitcode: 13" in r.stderr  # a rank died after step 4
    ckpt = tmp_path / "part" / "checkpoints" / "step_00000003"
    assert any((ckpt / "offloaded_tensors").rglob("*.swp")), "the checkpoint lacks the NVMe optimizer states"
    r = run_torchrun(part, 2, "--deepspeed_config", str(ds_part), *BIGGER, "--resume", "auto", timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 3" in r.stdout
    a, b = losses(tmp / "full"), losses(tmp_path / "part")
    assert a.keys() == b.keys() == set(range(1, 7))
    assert all(abs(a[s] - b[s]) <= 1e-6 * abs(a[s]) for s in a), (a, b)
    assert worst_relative(weights(tmp / "full"), weights(tmp_path / "part")) < 1e-6
