"""The same run at any layout, and resumed on any layout (real gloo processes).

With every stochastic part of the recipe on (drop path, mixup/cutmix, RandAugment, random
erasing) and evaluation at step 3 and the end: one process, grad_accum, DDP x2, ZeRO-1/2/3 x2,
ZeRO-3 + CPU offload x2 and the pipeline 2x1 and 2x2 follow the same losses. The resume matrix:
a checkpoint of one layout continues on others from its layout-free form, on the losses and
weights of the uninterrupted run, evaluates as it does, exports and exits 0. Each source
checkpoint is written once. Runs of the same number of ranks share a launch
(scenario_worker.py): the layouts' runs take three launches, the matrix's resumes three more.
Fine-tuning and evaluation start from checkpoints of every layout."""

import json
import subprocess
import sys
from collections import defaultdict

import pytest

from .launch_helpers import (REPO, assert_ok, env, launch_scenarios, losses, run_single, run_torchrun, shared_launches,
                             weights, worst_relative, write_config)

STEPS, EVERY, EVAL_EVERY = 4, 2, 3  # checkpoints at 2 (and 4); evaluations at 3 and at the end
RECIPE = ["--set", "data.mixup=0.8", "--set", "data.cutmix=1.0", "--set", "data.randaug=true",
          "--set", "data.erasing=0.25", "--set", "train.optimizer=adamw", "--set", "train.lr=2.0e-3",
          "--set", f"train.eval_every_steps={EVAL_EVERY}", "--set", "train.eval_batch_size=64"]
DS = {name: ["--deepspeed_config", str(REPO / "ds_configs" / f"{name}.json")]
      for name in ("zero1", "zero2", "zero3", "zero3_offload")}
PIPE = ["--set", "pipeline.stages=2", "--set", "pipeline.micro_batches=2"]
# name: (ranks, launcher arguments)
LAYOUTS = {"single": (1, []), "accum2": (1, ["--set", "train.grad_accum=2"]), "ddp2": (2, []),
           "zero1x2": (2, DS["zero1"]), "zero2x2": (2, DS["zero2"]), "zero3x2": (2, DS["zero3"]),
           "zero3offx2": (2, DS["zero3_offload"]), "pipe2x1": (2, PIPE),
           "pipe2x2z1": (4, PIPE + ["--set", "pipeline.zero=1"]), "pipe2x2z2": (4, PIPE + ["--set", "pipeline.zero=2"])}
# The resume matrix: target <- sources (their step-2 checkpoints). Every target from one
# process and from ZeRO-3 x2 (but itself) and more; every kind is the source of another.
# Resumed into zero3x2, the alphas are logged every step: a gather outside the forward must
# not change ZeRO-3's fetch trace after a resume (the final validation died of it).
MATRIX = {"single": ["zero3x2", "pipe2x2z2"], "ddp2": ["single", "zero3x2", "pipe2x1"],
          "zero1x2": ["single", "zero3x2", "zero2x2"], "zero2x2": ["single", "zero3x2"],
          "zero3x2": ["single", "ddp2", "zero3offx2"], "zero3offx2": ["single", "zero3x2", "zero1x2"],
          "pipe2x1": ["single", "zero3x2", "pipe2x2z2"], "pipe2x2z2": ["single", "zero3x2", "pipe2x1"]}
TARGET_EXTRA = {"zero3x2": ["--set", "train.log_every=1"]}
# Targets of the pairs tested before the matrix, kept: ZeRO-2 on one process, the pipeline 2x2
# without pipeline.zero, and 2x1 with it (no uninterrupted run of their own: their evaluations
# are not compared, the rest is)
OTHER_TARGETS = {"zero2x1": (1, DS["zero2"]), "pipe2x2": (4, PIPE), "pipe2x1z1": (2, PIPE + ["--set", "pipeline.zero=1"])}
PAIRS = {"zero2x1": ["zero2x2"], "pipe2x2": ["zero3x2"], "pipe2x1z1": ["pipe2x2z2"]}
# Runs besides the layouts', in their launches: a ZeRO-3 x2 checkpoint without its layout-free form
NATIVE = {"zero3x2_native": (2, [*DS["zero3"], "--set", "train.portable_checkpoint=false"])}
CHECKPOINT = f"checkpoints/step_{EVERY:08d}"


def _run(tmp, data_root, name, ranks, extra, resume=None):
    cfg = write_config(tmp, name, data_root, steps=STEPS, every=EVERY)
    args = [*RECIPE, *extra] + (["--resume", str(resume)] if resume else [])
    r = run_single(cfg, *args) if ranks == 1 and "--deepspeed_config" not in extra else run_torchrun(cfg, ranks, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / name, r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run of every layout (the references, and the checkpoints every resume
    starts from): the runs of one rank count share a launch, one process first."""
    tmp = tmp_path_factory.mktemp("layouts")
    data_root = tmp / "digits"
    from revcol_dist.data.digits import prepare_digits

    prepare_digits(data_root)
    items = [(name, ranks, ["--config", write_config(tmp, name, data_root, steps=STEPS, every=EVERY), *RECIPE, *extra])
             for name, (ranks, extra) in {**LAYOUTS, **NATIVE}.items()]
    for name, o in shared_launches(tmp, items, "layouts").items():
        assert_ok(o, name)
    return tmp, data_root, {name: tmp / name for name in {**LAYOUTS, **NATIVE}}


@pytest.fixture(scope="module")
def resumed(runs):
    """Each target layout resumes its sources' step-2 checkpoints; the resumes of one rank count
    share a launch; target -> {source: (output folder, RunOutput)}."""
    tmp, data_root, out = runs
    items = []
    for target, sources in {**MATRIX, **PAIRS}.items():
        ranks, extra = {**LAYOUTS, **OTHER_TARGETS}[target]
        for source in sources:
            cfg = write_config(tmp, f"{source}_to_{target}", data_root, steps=STEPS, every=EVERY)
            items.append(((target, source), ranks, ["--config", cfg, *RECIPE, *extra, *TARGET_EXTRA.get(target, []),
                                                    "--resume", out[source] / CHECKPOINT]))
    done = defaultdict(dict)
    for (target, source), o in shared_launches(tmp, items, "resumes").items():
        done[target][source] = (tmp / f"{source}_to_{target}", o)
    return done


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


def _val_log(out_dir):
    return [json.loads(line) for line in (out_dir / "val_log.jsonl").read_text().splitlines()]


def _same_evaluations(ref, got):
    """The same evaluations (step 3 and the end), top-1/top-5 equal, losses within 1e-5."""
    assert [(e["step"], e["tag"]) for e in got] == [(e["step"], e["tag"]) for e in ref], (ref, got)
    for a, b in zip(ref, got):
        assert a.keys() == b.keys()
        for k in a:
            if k.endswith(("top1", "top5")):
                assert a[k] == b[k], (k, a, b)
            elif k.endswith("loss"):
                assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (k, a, b)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("target", list(MATRIX) + list(PAIRS))
def test_resume_matrix(runs, resumed, target):
    """Every source of ``target`` continues there on the uninterrupted trajectory (losses 1e-5,
    weights and EMA 1e-4), evaluates as the uninterrupted run of ``target`` does (at step 3 and
    at the end), exports, and the launch exits 0."""
    tmp, data_root, out = runs
    ranks = {**LAYOUTS, **OTHER_TARGETS}[target][0]
    worst = {}
    for source, (folder, r) in resumed[target].items():
        assert_ok(r, source)
        checkpoint = out[source] / CHECKPOINT
        assert f"resumed from {checkpoint} at step {EVERY}" in r.stdout, (source, r.stdout[-2000:])
        # ZeRO-3 with and without CPU offload is one layout to a checkpoint (DeepSpeed's own, which
        # partitions alike): resumed natively; every other pair from the layout-free form
        assert ("layout-free form" in r.stdout) != ({source, target} == {"zero3x2", "zero3offx2"}), r.stdout[-2000:]
        ref, got = losses(out["single"]), losses(folder)
        assert got.keys() == set(range(EVERY + 1, STEPS + 1))
        assert _close({s: ref[s] for s in got}, got, 1e-5), (source, ref, got)
        w = worst_relative(weights(out["single"]), weights(folder))
        e = worst_relative(weights(out["single"], "state_dict_ema"), weights(folder, "state_dict_ema"))
        assert w < 1e-4 and e < 1e-4, (source, w, e)
        if target in out:
            _same_evaluations([v for v in _val_log(out[target]) if v["step"] > EVERY], _val_log(folder))
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["world_size"] == ranks and metrics["steps"] == STEPS
        worst[source] = {"loss": max(abs(ref[s] - got[s]) / abs(ref[s]) for s in got), "weights": w, "ema": e}
    print(f"resumed into {target}: " + json.dumps(worst))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_finetune_and_evaluate_checkpoints_of_every_layout(runs):
    """launchers/evaluate.py reproduces each layout's final validation from its last checkpoint
    (one launch, every checkpoint); launchers/finetune.py starts from each layout's step-2
    checkpoint (one launch): the same first loss from every one."""
    tmp, data_root, out = runs
    kinds = list(MATRIX)
    last = [out[k] / "checkpoints" / f"step_{STEPS:08d}" for k in kinds]
    res_path = tmp / "evaluated.json"
    r = subprocess.run([sys.executable, str(REPO / "launchers" / "evaluate.py"),
                        *[a for c in last for a in ("--checkpoint", str(c))], "--json", str(res_path)],
                       capture_output=True, text=True, env=env(), timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    for kind, res in zip(kinds, json.loads(res_path.read_text())):
        final = _val_log(out[kind])[-1]
        assert res["top1"] == final["val/top1"] and res["top5"] == final["val/top5"], (kind, res, final)
    argvs = []
    for kind in kinds:
        cfg = write_config(tmp, f"ft_from_{kind}", data_root, steps=1)
        argvs.append(["--config", cfg, "--pretrained", out[kind] / CHECKPOINT, "--set", "train.lr=1.0e-4"])
    r = launch_scenarios(tmp, 1, REPO / "launchers" / "finetune.py", argvs, "finetune_every_layout")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("loaded ") == len(kinds), r.stdout[-3000:]
    first = {k: losses(tmp / f"ft_from_{k}")[1] for k in kinds}
    assert all(abs(first[k] - first["single"]) <= 1e-4 * abs(first["single"]) for k in kinds), first


@pytest.mark.multiprocess
@pytest.mark.slow
def test_convert_a_native_checkpoint_then_resume_it_on_another_layout(runs):
    """A ZeRO-3 x2 checkpoint written without its layout-free form is refused elsewhere (the
    error names the converter), converted on its own layout (each rank its share), verified,
    and continues in one process on the uninterrupted run's losses and weights."""
    tmp, data_root, out = runs
    native = out["zero3x2_native"]  # written beside the layouts' runs
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
    from .test_zero_infinity import _async_io_builds, _nvme_config

    if not _async_io_builds():
        pytest.skip("DeepSpeed's async_io op does not build here (apt-get install libaio-dev)")
    from revcol_dist.data.digits import prepare_digits

    tmp, data_root = tmp_path, tmp_path / "digits"
    prepare_digits(data_root)
    ds = _nvme_config(tmp, "zero3_nvme")  # swap files under tmp / "nvme_zero3_nvme"
    # NVMe parameter offload has no EMA (refused); sub-groups this large are swapped (small ones stay in memory)
    no_ema = ["--set", "train.ema_decay=0", "--set", "model.args.channels=[64,128,256,512]",
              "--set", "model.args.num_columns=2"]
    full, _ = _run(tmp, data_root, "nvme2", 2, ["--deepspeed_config", str(ds), *no_ema])
    assert sum(f.stat().st_size for f in (tmp / "nvme_zero3_nvme").rglob("*") if f.is_file()) > 0
    resumed, r = _run(tmp, data_root, "nvme2_to_single", 1, no_ema,
                      resume=full / "checkpoints" / f"step_{EVERY:08d}")
    assert "layout-free form" in r.stdout
    ref, got = losses(full), losses(resumed)
    assert _close({s: ref[s] for s in got}, got, 1e-5) and got.keys() == set(range(EVERY + 1, STEPS + 1))
    assert worst_relative(weights(full), weights(resumed)) < 1e-4
