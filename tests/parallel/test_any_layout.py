"""The same run at any layout, and resumed on any layout (real gloo processes).

With every stochastic part of the recipe on (drop path, mixup/cutmix, RandAugment, random
erasing), one process, grad_accum, DDP x2, ZeRO-2 x2, ZeRO-3 x2 and the pipeline 2x1 follow the
same losses; and a checkpoint of one layout continues on another from its layout-free form:
the losses of the uninterrupted run, and its weights at the end."""

import json

import pytest

from .launch_helpers import REPO, losses, run_single, run_torchrun, weights, worst_relative, write_config

STEPS, EVERY = 4, 2
RECIPE = ["--set", "data.mixup=0.8", "--set", "data.cutmix=1.0", "--set", "data.randaug=true",
          "--set", "data.erasing=0.25", "--set", "train.optimizer=adamw", "--set", "train.lr=2.0e-3"]
DS = {f"zero{s}": ["--deepspeed_config", str(REPO / "ds_configs" / f"zero{s}.json")] for s in (2, 3)}
PIPE = ["--set", "pipeline.stages=2", "--set", "pipeline.micro_batches=2"]
# name: (ranks, launcher arguments)
LAYOUTS = {"single": (1, []), "accum2": (1, ["--set", "train.grad_accum=2"]), "ddp2": (2, []),
           "zero2x2": (2, DS["zero2"]), "zero3x2": (2, DS["zero3"]), "pipe2x1": (2, PIPE),
           "pipe2x2z1": (4, PIPE + ["--set", "pipeline.zero=1"]), "pipe2x2z2": (4, PIPE + ["--set", "pipeline.zero=2"])}
# checkpoint of layout A at step 2 -> continued on layout B
# ddp2 -> zero3x2 logs the alphas every step: a gather outside the forward must not change
# ZeRO-3's fetch trace after a resume (the final validation died of it)
PAIRS = [("zero2x2", "zero2x1", 1, DS["zero2"]), ("zero3x2", "single", 1, []),
         ("ddp2", "zero3x2", 2, DS["zero3"] + ["--set", "train.log_every=1"]),
         ("pipe2x1", "ddp2", 2, []), ("zero3x2", "pipe2x2", 4, PIPE),
         ("pipe2x2z2", "pipe2x1z1", 2, PIPE + ["--set", "pipeline.zero=1"])]


def _run(tmp, data_root, name, ranks, extra, resume=None):
    cfg = write_config(tmp, name, data_root, steps=STEPS, every=EVERY)
    args = [*RECIPE, *extra] + (["--resume", str(resume)] if resume else [])
    r = run_single(cfg, *args) if ranks == 1 and "--deepspeed_config" not in extra else run_torchrun(cfg, ranks, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / name, r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    data_root = tmp / "digits"
    from revcol_dist.data.digits import prepare_digits

    prepare_digits(data_root)
    out = {name: _run(tmp, data_root, name, ranks, extra)[0] for name, (ranks, extra) in LAYOUTS.items()}
    return tmp, data_root, out


def _close(a, b, tol):
    return all(abs(a[s] - b[s]) <= tol * abs(a[s]) for s in a)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("layout", [n for n in LAYOUTS if n != "single"])
def test_one_trajectory_at_every_layout(runs, layout):
    _, _, out = runs
    ref, got = losses(out["single"]), losses(out[layout])
    assert ref.keys() == got.keys() == set(range(1, STEPS + 1))
    assert _close(ref, got, 1e-5), (ref, got)
    assert worst_relative(weights(out["single"]), weights(out[layout])) < 1e-4
    assert worst_relative(weights(out["single"], "state_dict_ema"), weights(out[layout], "state_dict_ema")) < 1e-4


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pipe2x2z1", "pipe2x2z2"])
def test_stage_zero_halves_each_replica_optimizer_state(runs, layout):
    """pipeline.zero over 2 replicas: each stage's optimizer state is split between its two
    replicas (ranks are replica-major: rank = replica * 2 + stage), measured by the Trainer."""
    _, _, out = runs
    whole = json.loads((out["pipe2x1"] / "metrics.json").read_text())["optimizer_state_bytes"]
    shards = json.loads((out[layout] / "metrics.json").read_text())["optimizer_state_bytes"]
    for stage in range(2):
        mine = [shards[replica * 2 + stage] for replica in range(2)]
        assert sum(mine) == whole[stage], (whole, shards)
        assert max(mine) <= 0.5 * whole[stage] * 1.15, (whole, shards)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("source,target,ranks,extra", PAIRS, ids=[f"{a}->{b}" for a, b, _, _ in PAIRS])
def test_resume_on_another_layout(runs, source, target, ranks, extra):
    tmp, data_root, out = runs
    checkpoint = out[source] / "checkpoints" / f"step_{EVERY:08d}"
    assert (checkpoint / "portable" / "portable.json").is_file()
    resumed, r = _run(tmp, data_root, f"{source}_to_{target}", ranks, extra, resume=checkpoint)
    assert f"resumed from {checkpoint} at step {EVERY}" in r.stdout and "layout-free form" in r.stdout
    ref, got = losses(out["single"]), losses(resumed)
    assert got.keys() == set(range(EVERY + 1, STEPS + 1))
    assert _close({s: ref[s] for s in got}, got, 1e-5), (ref, got)
    assert worst_relative(weights(out["single"]), weights(resumed)) < 1e-4
    assert worst_relative(weights(out["single"], "state_dict_ema"), weights(resumed, "state_dict_ema")) < 1e-4
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["world_size"] == ranks and metrics["steps"] == STEPS


@pytest.mark.multiprocess
@pytest.mark.slow
def test_convert_a_native_checkpoint_then_resume_it_on_another_layout(runs):
    """A ZeRO-3 x2 checkpoint written without its layout-free form is refused elsewhere (the
    error names the converter), converted on its own layout (each rank its share), verified,
    and continues in one process on the uninterrupted run's losses and weights."""
    tmp, data_root, out = runs
    native, _ = _run(tmp, data_root, "zero3x2_native", 2, [*DS["zero3"], "--set", "train.portable_checkpoint=false"])
    checkpoint = native / "checkpoints" / f"step_{EVERY:08d}"
    assert not (checkpoint / "portable").exists()
    cfg = write_config(tmp, "native_to_single", data_root, steps=STEPS, every=EVERY)
    refused = run_single(cfg, *RECIPE, "--resume", str(checkpoint))
    assert refused.returncode == 2 and "launchers/convert_checkpoint.py" in refused.stderr, refused.stderr[-2000:]
    converter = REPO / "launchers" / "convert_checkpoint.py"
    wrong = run_torchrun(native / "config.yaml", 2, checkpoint.as_posix(), launcher=converter)  # without DeepSpeed
    assert wrong.returncode != 0 and "convert it on the layout that wrote it" in wrong.stderr, wrong.stderr[-2000:]
    r = run_torchrun(native / "config.yaml", 2, *DS["zero3"], checkpoint.as_posix(), launcher=converter)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "peak host memory per rank" in r.stdout
    marker = json.loads((checkpoint / "complete.json").read_text())
    assert any(k.startswith("portable/") for k in marker["files"])  # recorded: verified like the rest
    resumed, r = _run(tmp, data_root, "native_to_single", 1, [], resume=checkpoint)
    assert "layout-free form" in r.stdout
    ref, got = losses(out["single"]), losses(resumed)
    assert got.keys() == set(range(EVERY + 1, STEPS + 1))
    assert _close({s: ref[s] for s in got}, got, 1e-5), (ref, got)
    assert worst_relative(weights(out["single"]), weights(resumed)) < 1e-4


@pytest.mark.multiprocess
@pytest.mark.slow
def test_resume_from_zero_infinity_on_one_process(tmp_path):
    """ZeRO-3 with optimizer and parameters on NVMe (2 ranks) continues in one process from its
    layout-free form: the masters and moments come out of the swap files."""
    from .test_zero_infinity import _async_io_builds

    if not _async_io_builds():
        pytest.skip("DeepSpeed's async_io op does not build here (apt-get install libaio-dev)")
    from revcol_dist.data.digits import prepare_digits

    tmp, data_root = tmp_path, tmp_path / "digits"
    prepare_digits(data_root)
    nvme = tmp / "nvme"
    nvme.mkdir()
    ds = json.loads((REPO / "ds_configs" / "zero3_nvme.json").read_text())
    for part in ("offload_optimizer", "offload_param"):
        ds["zero_optimization"][part].update(nvme_path=str(nvme), pin_memory=False)
    (tmp / "zero3_nvme.json").write_text(json.dumps(ds))
    # NVMe parameter offload has no EMA (refused); sub-groups this large are swapped (small ones stay in memory)
    no_ema = ["--set", "train.ema_decay=0", "--set", "model.args.channels=[64,128,256,512]",
              "--set", "model.args.num_columns=2"]
    full, _ = _run(tmp, data_root, "nvme2", 2, ["--deepspeed_config", str(tmp / "zero3_nvme.json"), *no_ema])
    assert sum(f.stat().st_size for f in nvme.rglob("*") if f.is_file()) > 0
    resumed, r = _run(tmp, data_root, "nvme2_to_single", 1, no_ema,
                      resume=full / "checkpoints" / f"step_{EVERY:08d}")
    assert "layout-free form" in r.stdout
    ref, got = losses(full), losses(resumed)
    assert _close({s: ref[s] for s in got}, got, 1e-5) and got.keys() == set(range(EVERY + 1, STEPS + 1))
    assert worst_relative(weights(full), weights(resumed)) < 1e-4
