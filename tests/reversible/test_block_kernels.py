"""block_kernels' pieces against their plain formulas."""

import pytest
import torch

from revcol_dist.reversible import block_kernels


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-7), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)],
                         ids=["fp64", "fp32", "bf16"])
def test_linear_grads_are_a_matmul_and_a_sum(dtype, tol):
    """The bias gradient (in bf16: one more column of the weight gradient's matmul) equals the
    sum over tokens within the dtype's rounding (and the fp32 result's), the weight gradient is
    the matmul's, and both come back as tensors of their own (not views of a wider matmul)."""
    g = torch.Generator().manual_seed(0)
    grad_out = torch.randn(300, 24, generator=g, dtype=torch.float64)
    inp = torch.randn(300, 16, generator=g, dtype=torch.float64)
    gw, gb = block_kernels._linear_grads(grad_out.to(dtype), inp.to(dtype), torch.float32)
    assert gw.dtype == gb.dtype == torch.float32 and gw.shape == (24, 16) and gb.shape == (24,)
    assert gw.is_contiguous() and gb.is_contiguous()
    ref_w, ref_b = grad_out.t() @ inp, grad_out.sum(0)
    assert ((gw.double() - ref_w).norm() / ref_w.norm()).item() < tol
    assert ((gb.double() - ref_b).norm() / ref_b.norm()).item() < tol
    if dtype != torch.bfloat16:  # a plain matmul and sum where the padded matmul would round first (TF32)
        assert torch.equal(gw, (grad_out.to(dtype).t() @ inp.to(dtype)).float())
        assert torch.equal(gb, grad_out.to(dtype).sum(0).float())
