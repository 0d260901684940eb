"""benchmarks/codegen_on_device.py: on a CPU, its refusal and its arguments built from a
recorded call (the GPU part runs in a GPU session)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import codegen_on_device as cod  # noqa: E402
import fake_cuda  # noqa: E402
import triton_codegen as tc  # noqa: E402


def test_arguments_follow_the_recorded_shapes_layouts_dtypes_and_grads():
    bf, f32 = torch.bfloat16, torch.float32
    call = tc.Call("fusion", (tc.Tensor((2, 8, 4, 4), (0, 2, 3, 1), f32, True), None,
                              (tc.Tensor((8, 16), (0, 1), bf, False), 3), (1e-6, 0.0)), bf, True)
    x, none, (w, k), eps = cod.real_arguments(call, torch.device("cpu"))
    assert x.shape == (2, 8, 4, 4) and x.is_contiguous(memory_format=torch.channels_last) and x.requires_grad
    assert w.dtype == bf and w.shape == (8, 16) and w.is_contiguous() and not w.requires_grad
    assert none is None and k == 3 and eps == (1e-6, 0.0)
    assert x.std() > 0  # values drawn, not left uninitialised


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda_in_one_line(capsys):
    assert cod.main(["--functions", "forward_full"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "triton_codegen.py" in err[0]


def test_misspelled_functions_are_refused_in_one_line(capsys):
    assert cod.main(["--functions", "forward_ful"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "forward_ful" in err[0] and "forward_full" in err[0]


def test_rows_weight_each_distinct_call_by_its_count_and_stop_at_the_budget():
    f32 = torch.float32
    x = tc.Tensor((2, 8, 4, 4), (0, 1, 2, 3), f32, True)
    calls = {tc.Call("fusion", (x,), None, True, True): 3, tc.Call("fusion", (x,), None, True, False): 5,
             tc.Call("forward_full", (x,), None, False): 7}
    lines = []
    launches = lambda k, gb: fake_cuda.Launches([fake_cuda.Launch(f"triton_{i}", True, gb / k) for i in range(k)])  # noqa: E731

    def measure(call):
        return ([launches(4, 0.5), launches(6, 1.0)] if call.backward else [launches(4, 0.5)]), 2.0

    rows = cod.add_up(calls, measure, set(), 1e9, lines.append)
    assert rows["fusion"] == dict(calls=8, backward_calls=3, device_kernels=3 * 10 + 5 * 4,
                                  device_gb=pytest.approx(3 * 1.5 + 5 * 0.5), ms=8 * 2.0)
    assert rows["forward_full"]["device_kernels"] == 7 * 4 and len(lines) == 3
    only = cod.add_up(calls, measure, {"forward_full"}, 1e9, lines.append)
    assert set(only) == {"forward_full"}
    stopped = []
    assert not cod.add_up(calls, measure, set(), -1.0, stopped.append) and "budget" in stopped[0]["stopped"]


@pytest.mark.slow
def test_recorded_calls_compile_run_and_are_timed_on_the_cpu():
    """The device path's plumbing, on inductor's CPU backend: a fusion's training call whose
    backward ran gives two graphs (forward, backward), one whose backward did not run gives its
    forward alone, a call without grad one graph; each timed."""
    tiny = {"channels": [8, 16, 24, 32], "layers": [1, 1, 1, 1], "num_columns": 2}
    calls = tc.record_step("revcol_tiny", 1, 64, tiny)
    fusions = [c for c in calls if c.name == "fusion" and c.grad and any(tc._requires_grad(c.args))]
    options = dict(tc.compile_setting.inductor_options(False))
    cpu = torch.device("cpu")
    for call, graphs in ((next(c for c in fusions if c.backward and c.args[1] is not None), 2),
                         (next(c for c in fusions if not c.backward and len(tc._requires_grad(c.args)) > 1), 1),
                         (next(c for c in calls if not c.grad), 1)):
        launches, ms = cod.measure_call(call, options, cpu, reps=2)
        assert len(launches) == graphs and ms > 0, call.name
