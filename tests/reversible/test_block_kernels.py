"""block_kernels' pieces against their plain formulas."""

import pytest
import torch

from revcol_dist.reversible import block_kernels


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-7), (torch.bfloat16, 1e-2)], ids=["fp64", "bf16"])
def test_linear_grads_are_a_matmul_and_a_sum(dtype, tol):
    """The bias gradient as one more column of the weight gradient's matmul equals the sum over
    tokens (within the dtype's rounding, and the fp32 result's), and the weight gradient is the matmul's."""
    g = torch.Generator().manual_seed(0)
    grad_out = torch.randn(300, 24, generator=g, dtype=torch.float64)
    inp = torch.randn(300, 16, generator=g, dtype=torch.float64)
    gw, gb = block_kernels._linear_grads(grad_out.to(dtype), inp.to(dtype), torch.float32)
    assert gw.dtype == gb.dtype == torch.float32 and gw.shape == (24, 16) and gb.shape == (24,)
    ref_w, ref_b = grad_out.t() @ inp, grad_out.sum(0)
    assert ((gw.double() - ref_w).norm() / ref_w.norm()).item() < tol
    assert ((gb.double() - ref_b).norm() / ref_b.norm()).item() < tol
    if dtype == torch.float64:
        assert torch.equal(gw, (grad_out.t() @ inp).float())  # the weight's own matmul, untouched
