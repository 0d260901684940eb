"""benchmarks/triton_codegen.py and its fake CUDA device (benchmarks/fake_cuda.py): inductor's
CUDA code read without a GPU, its launches and bytes checked against hand counts, and the
recorded step carried to another size exactly."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fake_cuda  # noqa: E402

pytestmark = pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))

TINY = {"channels": [8, 16, 24, 32], "layers": [1, 1, 1, 1], "num_columns": 2}


def test_layer_norm_launches_and_bytes_as_counted_by_hand():
    T, C = 4096, 72
    with fake_cuda.FakeCuda() as cuda:
        x, w, b = cuda.tensor((T, C), torch.float32), cuda.tensor((C,), torch.float32), cuda.tensor((C,), torch.float32)
        ln = lambda x, w, b: F.layer_norm(x, (C,), w, b, 1e-6)  # noqa: E731
        compiled = cuda.compiled_launches(ln, [x, w, b])
        eager = cuda.eager_launches(ln, [x, w, b])
    # one generated kernel: x and the affine read, the output written
    assert compiled.triton == compiled.kernels == 1
    assert compiled.gb == pytest.approx((2 * T * C * 4 + 2 * C * 4) / 1e9, rel=1e-3)
    # eager: native_layer_norm, which also writes its mean and rstd
    assert [k.name for k in eager.launches] == ["native_layer_norm"]
    assert eager.gb == pytest.approx((2 * T * C * 4 + 2 * C * 4 + 2 * T * 4) / 1e9, rel=1e-9)


def test_a_block_forward_fuses_between_its_convolution_and_matmuls():
    from revcol_dist.reversible import block_kernels

    N, C, H = 4, 16, 8
    bf, f32 = torch.bfloat16, torch.float32
    with fake_cuda.FakeCuda() as cuda:
        t = cuda.tensor
        x = t((N, C, H, H), f32, (C * H * H, 1, H * C, C))  # the residual stream, channels-last
        args = [x, t((C, 1, 7, 7), bf), t((C,), bf), t((C,), f32), t((C,), f32), t((4 * C, C), bf), t((4 * C,), bf),
                t((C, 4 * C), bf), t((C,), bf), t((C,), f32), t((N, 1, 1, 1), f32), ((1, 1), (3, 3), (1, 1), C), 1e-6]
        compiled = cuda.compiled_launches(block_kernels.forward_full, args, torch.bfloat16)
        eager = cuda.eager_launches(block_kernels.forward_full, args, torch.bfloat16)
    assert compiled.extern == eager.extern == ["convolution", "addmm", "addmm"]
    # between them: the input's cast, LayerNorm, GELU, layer scale + drop path + residual
    assert compiled.triton == 4 < eager.triton
    assert 0 < compiled.gb < eager.gb
    # the extern kernels' bytes (inductor's count) by hand: the convolution reads x (bf16) and its
    # weight and writes its output (inductor adds its bias in the next kernel); each addmm reads its
    # input, weight and bias and writes its output
    T, w = N * H * H, 2
    by_hand = (2 * T * C + C * 49) * w + (T * C + 4 * C * C + 4 * C + T * 4 * C) * w + (T * 4 * C + 4 * C * C + C + T * C) * w
    assert compiled.extern_gb == pytest.approx(by_hand / 1e9, rel=1e-6)
    assert eager.extern_gb == pytest.approx((by_hand + C * w) / 1e9, rel=1e-6)  # eager's convolution adds its bias


def test_matmul_templates_take_their_neighbours_in():
    from revcol_dist.reversible import block_kernels

    N, C, H = 4, 16, 8
    bf, f32 = torch.bfloat16, torch.float32
    out = {}
    for templates in (False, True):
        with fake_cuda.FakeCuda(matmul_templates=templates) as cuda:
            t = cuda.tensor
            x = t((N, C, H, H), f32, (C * H * H, 1, H * C, C))
            args = [x, t((C, 1, 7, 7), bf), t((C,), bf), t((C,), f32), t((C,), f32), t((4 * C, C), bf),
                    t((4 * C,), bf), t((C, 4 * C), bf), t((C,), bf), t((C,), f32), t((N, 1, 1, 1), f32),
                    ((1, 1), (3, 3), (1, 1), C), 1e-6]
            out[templates] = cuda.compiled_launches(block_kernels.forward_full, args, torch.bfloat16)
    extern, templated = out[False], out[True]
    # GELU into the first matmul, layer scale + residual into the second: two launches fewer, and
    # neither the hidden map's second pass nor the second matmul's output go through memory again
    assert "addmm" not in templated.extern and sum(k.name.startswith("triton_tem") for k in templated.launches) >= 2
    assert templated.kernels == extern.kernels - 2
    assert templated.gb + templated.extern_gb < extern.gb + extern.extern_gb
    # the templates count their own bytes: at least each matmul's operands and output once (pwconv1
    # also writes GELU's input, kept for the backward)
    T = N * H * H
    matmuls = (T * C + 4 * C * C + T * 4 * C) * 2 + (T * 4 * C + 4 * C * C + T * C) * 2
    assert sum(k.gb for k in templated.launches if k.name.startswith("triton_tem")) >= 0.99 * matmuls / 1e9


def test_a_trained_matmul_and_gelu_split_into_a_forward_and_a_backward_as_counted_by_hand():
    T, C, D = 4096, 64, 256
    bf = torch.bfloat16
    fn = lambda x, w: F.gelu(x @ w.t())  # noqa: E731
    with fake_cuda.FakeCuda() as cuda:
        x, w = cuda.tensor((T, C), bf), cuda.tensor((D, C), bf)
        forward, backward = cuda.training_launches(fn, [x, w], requires_grad=[True, True])
        _, weight_only = cuda.training_launches(fn, [x, w], requires_grad=[False, True])
        eager_forward, eager_backward = cuda.eager_training_launches(fn, [x, w], requires_grad=[True, True])
    # forward: the matmul, then GELU (which writes the output; the matmul's output is kept for the backward)
    assert forward.extern == ["mm"] and forward.triton == 1
    assert forward.gb == pytest.approx(2 * T * D * 2 / 1e9, rel=1e-3)
    # backward: GELU's derivative in one kernel (the gradient and the kept matmul output read, dh
    # written), then dx and dw as two matmuls; with x not requiring grad, only dw
    assert backward.extern == ["mm", "mm"] and backward.triton == 1
    assert backward.gb == pytest.approx(3 * T * D * 2 / 1e9, rel=1e-3)
    assert weight_only.extern == ["mm"]
    assert [k.name for k in eager_backward.launches] == ["gelu_backward", "mm", "mm"]
    assert eager_forward.kernels == 2


def test_the_fake_device_leaves_nothing_behind():
    before = (torch.cuda.is_available(), torch.Tensor.__getitem__, torch.Tensor.contiguous)
    with fake_cuda.FakeCuda() as cuda:
        assert torch.cuda.is_available()
        assert cuda.tensor((2, 3), torch.float32)[:, None].shape == (2, 1, 3)
    assert (torch.cuda.is_available(), torch.Tensor.__getitem__, torch.Tensor.contiguous) == before
    assert torch.arange(6).view(2, 3)[1, 1:].tolist() == [4, 5]


def test_glue_counts_the_step_s_eager_ops_and_not_a_recorded_call_s():
    """The step's eager launches: a recorded call's forward and its autograd backward are the
    compiled graphs' (counted apart), the ops around it are the step's."""
    import triton_codegen as tc

    calls: list = []
    recorded = tc._recorder("fusion", lambda x, w: (x * w).sin(), calls)
    glue = tc.GlueCount()
    x, w = torch.randn(8, 8, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    with glue:
        z = x * 2
        y = recorded(z, w) + z  # z's gradient: the call's part and the add's, summed by the engine
        (y + 1).sum().backward()
    assert not tc._GLUE  # the count in effect only inside its block
    names = Counter(k.name for k in glue.out.launches)
    # x * 2 and its backward, the two adds, the engine's sum of z's two parts, the sum and its
    # seed; not sin, cos or the call's products
    assert names["mul"] == 2 and names["add"] == 3 and names["sum"] == 1 and "sin" not in names and "cos" not in names
    assert calls[0][1]  # the call's backward ran
    assert glue.out.gb == pytest.approx(sum(k.gb for k in glue.out.launches)) and glue.out.gb > 0


def test_glue_bytes_carried_exactly_where_they_scale_with_batch_and_area():
    import triton_codegen as tc

    def by_hand(n, r):  # weight-sized, pooled (per sample) and map-sized (per sample and pixel)
        return 5.0 + 3.0 * n + 2.0 * n * r * r

    assert tc._carry_gb(by_hand(1, 1), by_hand(2, 1), by_hand(1, 2), 128, 3.5) == pytest.approx(by_hand(128, 3.5))
    assert tc._carry_gb(by_hand(2, 1), by_hand(4, 1), by_hand(2, 2), 128, 3.5, base=2) == pytest.approx(by_hand(128, 3.5))


@pytest.mark.slow
def test_calls_carried_to_a_size_equal_the_calls_recorded_there():
    import triton_codegen as tc

    carried = tc.step_calls("revcol_tiny", 4, 128, 64, TINY)
    recorded = Counter(tc.record_step("revcol_tiny", 4, 128, TINY, target=(4, 128)))
    assert carried == recorded
    assert {c.name for c in carried} >= {"forward_full", "block_grads", "tail_grads", "body_grads", "fusion",
                                         "decoder_stage", "decoder_output"}
    # each decoder stage's backward, and its output's, runs once per step (of three forward
    # calls: the forward, the checkpointed decoder's recomputation, the checkpointed stage's)
    ran = Counter()
    for c, n in carried.items():
        ran[c.name, c.backward] += n
    assert ran["decoder_stage", True] == 3 and ran["decoder_stage", False] == 6  # TINY has one decoder
    assert ran["decoder_output", True] == 1
    # a fusion's backward runs for its recomputation, not for the reversible forward's detached
    # call, and at most once per Fusion module (TINY has 8)
    assert 0 < ran["fusion", True] <= 8 and ran["fusion", False] > 0
    # the weights the step casts once arrive in bf16 and are marked, so that the eager baseline
    # gets them in fp32 (as train.compile: false passes them) and casts them in the call
    weights = {"forward_full": 1, "fusion": 3, "decoder_stage": 2}  # a conv or Linear weight's argument

    def weight(call):
        a = call.args[weights[call.name]]
        return a if a is None or isinstance(a, tc.Tensor) else a[0]

    seen = [(c.name, weight(c)) for c in carried if c.name in weights and weight(c) is not None]
    assert all(w.cast == (w.dtype == torch.bfloat16) for _, w in seen)  # fp32: a fusion the engine does not run
    assert {name for name, w in seen if w.cast} == set(weights)
    activations = [c.args[0] for c in carried if c.name in weights]
    assert not any(a.cast for a in activations)

@pytest.mark.slow
def test_cli_prints_a_line_per_function_and_the_step_against_eager(capsys, monkeypatch):
    import triton_codegen as tc

    monkeypatch.setenv("CI", "true")  # inductor's own CI check stays out of the fake device's way
    tc.main(["--model", "revcol_tiny", "--model-args", json.dumps(TINY), "--batch", "4", "--res", "128",
             "--res-small", "64"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    functions, total = [r for r in rows[:-1] if r["function"] != "eager_glue"], rows[-1]
    assert {r["function"] for r in functions} >= {"forward_full", "block_grads", "fusion", "decoder_stage", "loss"}
    assert total["calls"] == sum(r["calls"] for r in functions)
    assert 0 < total["backward_calls"] == sum(r["backward_calls"] for r in functions)
    assert total["compiled_kernels"] == sum(r["compiled_kernels"] for r in functions)
    # every generated kernel's bytes counted (torch 2.11's combined kernels carry none; off here)
    assert total["kernels_without_gb"] == 0 and all(r["kernels_without_gb"] == 0 for r in functions)
    assert 0 < total["kernels_compiled_over_eager"] < 1 and 0 < total["gb_compiled_over_eager"] < 1
    assert total["compiled_ms_at_peak"] == pytest.approx(total["compiled_gb"] / 4000 * 1e3, abs=1e-3)
    # the same matmuls and convolutions counted twice, independently: inductor's scheduler on the
    # compiled side, the eager ops' tensors on the other (a convolution's bias apart)
    assert total["compiled_extern_gb"] == pytest.approx(total["eager_extern_gb"], rel=0.02)
    # the step's eager launches outside the compiled functions, carried to the size, in the step
    glue = next(r for r in rows if r["function"] == "eager_glue")
    assert 0 < glue["kernels"] == total["eager_glue_kernels"] and 0 < glue["gb"] == total["eager_glue_gb"]
    assert total["step_kernels"] == total["compiled_kernels"] + glue["kernels"]
    assert total["step_gb"] == pytest.approx(total["compiled_gb"] + glue["gb"], abs=2e-3)


@pytest.mark.slow
def test_resize_indices_passed_in_save_the_index_kernels():
    """A decoder stage (bilinear 7² -> 14²) and a fusion's up part (nearest 7² -> 14²) as
    training graphs, their resize as ``F.interpolate`` (inductor computes the source indices in
    the graph, and the partitioner saves them for the backward: a kernel each) against the
    indices passed in (``reversible/resize.py``): six and one fewer forward kernels, the
    backward no longer, the bytes the same within the index tensors'."""
    from revcol_dist.parallel import decoder_kernels
    from revcol_dist.reversible import fusion_kernels, resize

    def stage_interpolating(x, size, proj, block, block_conv, eps, index):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(resize, "bilinear", lambda y, _: F.interpolate(y, size=size, mode="bilinear", align_corners=True))
            return decoder_kernels.stage_forward(x, size, proj, block, block_conv, eps, index)

    def up_interpolating(x, w, b, lw, lb, index):
        u = fusion_kernels._layer_norm(F.linear(x.permute(0, 2, 3, 1), w, b), lw, lb, 1e-6).permute(0, 3, 1, 2)
        return F.interpolate(u, size=(14, 14), mode="nearest")

    def up_indexed(x, w, b, lw, lb, index):
        return fusion_kernels._up(x, w, b, lw, lb, 1e-6, index)

    N, C, D = 4, 32, 16
    bf, f32 = torch.bfloat16, torch.float32
    counts = {}
    with fake_cuda.FakeCuda() as cuda:
        t = cuda.tensor
        dev = torch.device("cuda")
        x = t((N, C, 7, 7), f32, (C * 49, 1, 7 * C, C))
        proj = (t((D, C, 1, 1), bf), t((D,), bf), t((D,), f32), t((D,), f32))
        block = (t((D, 1, 3, 3), bf), t((D,), bf), t((D,), f32), t((D,), f32), t((4 * D, D), bf), t((4 * D,), bf),
                 t((D, 4 * D), bf), t((D,), bf), t((D,), f32))
        with pytest.MonkeyPatch.context() as m:  # the index tensors as fake device tensors of their real shapes
            m.setattr(torch, "arange", lambda n, **kw: t((n,), kw.get("dtype") or torch.int64))
            bil = resize.bilinear_indices.make((7, 7), (14, 14), dev)
            near = resize.nearest_indices.make((7, 7), (14, 14), dev)
        stage_args = [x, (14, 14), proj, block, ((1, 1), (1, 1), (1, 1), D), (1e-6, 1e-6), bil]
        grads = [True] + [True] * 4 + [True] * 9 + [False] * 6
        for name, fn in (("interpolate", stage_interpolating), ("indexed", decoder_kernels.stage_forward)):
            counts["stage", name] = cuda.training_launches(fn, stage_args, bf, {"force_layout_optimization": True}, grads)
        up_args = [t((N, 2 * C, 7, 7), f32, (2 * C * 49, 1, 14 * C, 2 * C)), t((C, 2 * C), bf), t((C,), bf),
                   t((C,), f32), t((C,), f32), near]
        for name, fn in (("interpolate", up_interpolating), ("indexed", up_indexed)):
            counts["up", name] = cuda.training_launches(fn, up_args, bf, {"force_layout_optimization": True},
                                                        [True] * 5 + [False] * 2)
    for what, fewer in (("stage", 6), ("up", 1)):
        (fw_old, bw_old), (fw_new, bw_new) = counts[what, "interpolate"], counts[what, "indexed"]
        assert fw_new.kernels == fw_old.kernels - fewer, what
        assert bw_new.kernels <= bw_old.kernels, what
        assert fw_new.gb == pytest.approx(fw_old.gb, rel=0.01) and bw_new.gb == pytest.approx(bw_old.gb, rel=0.01)


@pytest.mark.slow
def test_generated_kernels_compile_for_sm90_and_combined_pointwise_kernels_launch_fewer():
    """A decoder stage's training graphs (7² -> 14²) with ``train.compile``'s options, with and
    without ``train.compile_combo``: combining launches fewer kernels, moving no more bytes, and
    every kernel of both compiles for the H200 (Triton and ptxas, sm_90) without spilling; a
    kernel that does not compile is reported, not counted as compiled."""
    from revcol_dist.parallel import compile as compile_setting
    from revcol_dist.parallel import decoder_kernels
    from revcol_dist.reversible import resize

    N, C, D = 4, 32, 16
    bf, f32 = torch.bfloat16, torch.float32
    codes = {}
    with fake_cuda.FakeCuda() as cuda:
        t = cuda.tensor
        x = t((N, C, 7, 7), f32, (C * 49, 1, 7 * C, C))
        proj = (t((D, C, 1, 1), bf), t((D,), bf), t((D,), f32), t((D,), f32))
        block = (t((D, 1, 3, 3), bf), t((D,), bf), t((D,), f32), t((D,), f32), t((4 * D, D), bf), t((4 * D,), bf),
                 t((D, 4 * D), bf), t((D,), bf), t((D,), f32))
        with pytest.MonkeyPatch.context() as m:
            m.setattr(torch, "arange", lambda n, **kw: t((n,), kw.get("dtype") or torch.int64))
            index = resize.bilinear_indices.make((7, 7), (14, 14), torch.device("cuda"))
        args = [x, (14, 14), proj, block, ((1, 1), (1, 1), (1, 1), D), (1e-6, 1e-6), index]
        grads = [True] + [True] * 4 + [True] * 9 + [False] * 6
        for combo in (False, True):
            options = compile_setting.inductor_options(False, combo)
            codes[combo] = cuda.training_codes(decoder_kernels.stage_forward, args, bf, options, grads)
            launches = [cuda.launches(code) for code in codes[combo]]
            codes[combo, "kernels"] = sum(k.kernels for k in launches)
            codes[combo, "gb"] = sum(k.gb for k in launches)
            codes[combo, "uncounted"] = sum(k.uncounted for k in launches)
    assert codes[False, "uncounted"] == 0  # every kernel's bytes in its code
    assert codes[True, "kernels"] < codes[False, "kernels"]
    # the same bytes as inductor counts them on torch 2.13; on 2.11 a combined kernel carries no
    # byte count (kernel_num_gb), so it counts none here
    assert codes[True, "gb"] <= codes[False, "gb"] * (1 + 1e-6)
    sources = [s for combo in (False, True) for code in codes[combo] for s in fake_cuda.kernel_sources(code)]
    assert len(sources) >= codes[False, "kernels"] // 2
    binaries = fake_cuda.compile_kernels(sources)
    assert [b.error for b in binaries if b.error] == []
    assert all(b.registers and min(b.registers) > 0 and not b.spills for b in binaries)
    name, source = sources[0]
    broken = fake_cuda.compile_kernels([(name, source.replace("tl.load(", "tl.lod(", 1))])[0]
    assert broken.error is not None and not broken.registers
