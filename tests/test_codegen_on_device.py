"""benchmarks/codegen_on_device.py: on a CPU, its refusal and its arguments built from a
recorded call (the GPU part runs in a GPU session)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import codegen_on_device as cod  # noqa: E402
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


@pytest.mark.slow
def test_a_recorded_call_compiles_runs_backward_and_is_timed_on_the_cpu():
    """The device path's plumbing, on inductor's CPU backend: a fusion's training call compiled by
    torch.compile, its forward's and backward's code captured, timed."""
    tiny = {"channels": [8, 16, 24, 32], "layers": [1, 1, 1, 1], "num_columns": 2}
    calls = tc.record_step("revcol_tiny", 1, 64, tiny)
    call = next(c for c in calls if c.name == "fusion" and c.backward and c.args[1] is not None)
    options = dict(tc.compile_setting.inductor_options(False))
    launches, ms = cod.measure_call(call, options, torch.device("cpu"), reps=2)
    assert len(launches) == 2 and ms > 0  # forward and backward generated, the pair timed
