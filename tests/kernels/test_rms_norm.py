"""RMSNorm kernel (impl="triton", interpreted) and its torch twin against fp64 formulas written here."""
import pytest
import torch

from megacpm.kernels import rms_norm
from megacpm.kernels.rms_norm import rms_norm_torch
from tolerance import assert_close_to_reference, dtype_atol

EPS = 1e-5


def reference(x, weight, eps):
    """fp64 truth: w * x / sqrt(mean(x^2) + eps)."""
    x64 = x.detach().double()
    return weight.detach().double() * x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps)


def run(impl, x, weight, dy, eps=EPS):
    x = x.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    y = rms_norm(x, weight, eps, impl=impl)
    dx, dw = torch.autograd.grad(y, (x, weight), dy.to(y.dtype))
    return y, dx, dw


def reference_grads(x, weight, dy, eps=EPS):
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    y = w64 * x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps)
    dx, dw = torch.autograd.grad(y, (x64, w64), dy.double())
    return y.detach(), dx, dw


def make(shape, dtype, weight_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(weight_dtype)
    dy = torch.randn(shape, generator=g)
    return x, weight, dy


def check_all(x, weight, dy, eps=EPS, factor=2.0):
    y_ref, dx_ref, dw_ref = reference_grads(x, weight, dy.to(torch.promote_types(x.dtype, weight.dtype)), eps)
    y_t, dx_t, dw_t = run("torch", x, weight, dy, eps)
    y_k, dx_k, dw_k = run("triton", x, weight, dy, eps)
    assert y_k.dtype == y_t.dtype == torch.promote_types(weight.dtype, x.dtype)
    assert y_k.shape == x.shape
    assert dx_k.dtype == x.dtype and dw_k.dtype == weight.dtype
    out_dtype = y_t.dtype
    # The torch implementation itself: within a few ulps of its dtype of the fp64 truth.
    scale = max(1.0, y_ref.abs().max().item())
    # (the normalised value is rounded to x's dtype, so the coarser of the two dtypes sets the ulp)
    ulp = max(torch.finfo(x.dtype).eps, torch.finfo(out_dtype).eps)
    assert_close_to_reference(y_t, y_ref, atol=4 * ulp * scale, name="torch y")
    # The kernel: at most factor x PyTorch's own error, plus a small atol.
    assert_close_to_reference(y_k, y_ref, y_t, factor, dtype_atol(out_dtype, scale), name="triton y")
    for name, k, t, ref, dtype in (("dx", dx_k, dx_t, dx_ref, x.dtype), ("dweight", dw_k, dw_t, dw_ref, weight.dtype)):
        gscale = max(1.0, ref.abs().max().item())
        # torch's backward rounds intermediate gradients to x's dtype: a few ulps of the coarser dtype
        gulp = max(torch.finfo(x.dtype).eps, torch.finfo(dtype).eps)
        assert_close_to_reference(t, ref, atol=8 * gulp * gscale, name=f"torch {name}")
        assert_close_to_reference(k, ref, t, factor, dtype_atol(dtype, gscale) + 1e-6 * gscale, name=f"triton {name}")


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("hidden", [1, 7, 33, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_backward_odd_shapes(rows, hidden, dtype):
    x, weight, dy = make((rows, hidden), dtype, seed=rows * 1000 + hidden)
    check_all(x, weight, dy)


def test_fp16_and_leading_dims():
    x, weight, dy = make((2, 3, 40), torch.float16, seed=7)
    check_all(x, weight, dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_in_input_dtype(dtype):
    """A pure low-precision model: weight in x's dtype, output in that dtype too."""
    x, weight, dy = make((5, 24), dtype, weight_dtype=dtype, seed=3)
    check_all(x, weight, dy)


def test_non_contiguous_input_and_large_eps():
    x, weight, dy = make((6, 20), torch.float32, seed=11)
    x_wide = torch.randn(6, 50)
    x_wide[:, 5:25] = x
    view = x_wide[:, 5:25]
    assert not view.is_contiguous()
    check_all(view, weight, dy, eps=0.5)
    transposed = x.t().contiguous().t()
    assert not transposed.is_contiguous()
    check_all(transposed, weight, dy)


def test_output_matches_torch_dtype_promotion():
    for x_dtype in (torch.float32, torch.float16, torch.bfloat16):
        for w_dtype in (torch.float32, torch.bfloat16):
            x, weight, _ = make((2, 8), x_dtype, weight_dtype=w_dtype)
            y = rms_norm(x, weight, EPS, impl="triton")
            assert y.dtype == rms_norm_torch(x, weight, EPS).dtype


def test_bf16_normalised_value_rounded_before_gain():
    """The normalised value is cast to x's dtype before the gain: a bitwise match with the torch code."""
    x, weight, _ = make((9, 33), torch.bfloat16, seed=5)
    y_k = rms_norm(x, weight, EPS, impl="triton")
    y_t = rms_norm_torch(x, weight, EPS)
    # Both round x * rstd to bf16 and multiply by the fp32 weight: at most one bf16 rounding apart
    # where fp32 rstd itself differs in the last bit.
    torch.testing.assert_close(y_k, y_t, rtol=2 ** -7, atol=0)


def test_only_x_or_only_weight_needs_grad():
    x, weight, dy = make((4, 10), torch.float32)
    xg = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(rms_norm(xg, weight, EPS, impl="triton"), (xg,), dy)
    _, dx_ref, _ = reference_grads(x, weight, dy)
    assert_close_to_reference(dx, dx_ref, atol=1e-5)
    wg = weight.clone().requires_grad_(True)
    (dw,) = torch.autograd.grad(rms_norm(x, wg, EPS, impl="triton"), (wg,), dy)
    _, _, dw_ref = reference_grads(x, weight, dy)
    assert_close_to_reference(dw, dw_ref, atol=1e-5)


def test_zero_rows_and_auto_dispatch():
    weight = torch.ones(8)
    empty = torch.empty(0, 8)
    assert rms_norm(empty, weight, EPS, impl="triton").shape == (0, 8)
    # Under the interpreter "auto" is the kernel; fp64 (which the kernel does not take) stays on torch.
    x64 = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(rms_norm(x64, weight.double(), EPS), rms_norm_torch(x64, weight.double(), EPS))
    with pytest.raises(TypeError):
        rms_norm(x64, weight.double(), EPS, impl="triton")
    with pytest.raises(ValueError):
        rms_norm(torch.randn(3, 8), torch.ones(7), EPS, impl="triton")
