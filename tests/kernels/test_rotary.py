"""Rotary kernel (impl="triton", interpreted) and its torch twin against fp64 formulas written here."""
import math

import pytest
import torch

from megacpm.kernels import rotary
from megacpm.kernels.rotary import rotary_torch
from tolerance import assert_close_to_reference, dtype_atol


def tables(n_positions, half, base=10000.0):
    """fp32 half-width tables cos, sin [n_positions, half] and their fp64 twins."""
    inv = torch.tensor([1.0 / base ** (2 * i / (2 * half)) for i in range(half)], dtype=torch.float64)
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * inv[None, :]
    return angles.cos().float(), angles.sin().float()


def reference(x, cos, sin, offset=0):
    """fp64 truth: cat(x1 c - x2 s, x2 c + x1 s) with the fp32 tables (exactly representable in fp64)."""
    x64 = x.detach().double()
    half = x.shape[-1] // 2
    c = cos.double()[offset: offset + x.shape[1]][None, :, None, :]
    s = sin.double()[offset: offset + x.shape[1]][None, :, None, :]
    x1, x2 = x64[..., :half], x64[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


def reference_grad(dy, cos, sin, offset=0):
    """The transpose of the rotation: the same formula with -sin."""
    return reference(dy, cos, -sin, offset)


def run(impl, x, cos, sin, dy, offset=0):
    leaf = x.detach().clone().requires_grad_(True)
    y = rotary(leaf, cos, sin, impl=impl, position_offset=offset)
    (dx,) = torch.autograd.grad(y, (leaf,), dy.to(y.dtype))
    return y, dx


def check(x, cos, sin, offset=0, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(x.shape, generator=g).to(x.dtype)
    y_ref = reference(x, cos, sin, offset)
    dx_ref = reference_grad(dy, cos, sin, offset)
    y_t, dx_t = run("torch", x, cos, sin, dy, offset)
    y_k, dx_k = run("triton", x, cos, sin, dy, offset)
    assert y_k.dtype == x.dtype == y_t.dtype and dx_k.dtype == x.dtype
    assert y_k.shape == x.shape and dx_k.shape == x.shape
    for name, k, t, ref in (("y", y_k, y_t, y_ref), ("dx", dx_k, dx_t, dx_ref)):
        scale = max(1.0, ref.abs().max().item())
        ulp = torch.finfo(x.dtype).eps
        assert_close_to_reference(t, ref, atol=2 * ulp * scale, name=f"torch {name}")
        assert_close_to_reference(k, ref, t, 2.0, dtype_atol(x.dtype, scale), name=f"triton {name}")


def make(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2).to(dtype)


@pytest.mark.parametrize("head_dim", [2, 6, 14, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_backward(head_dim, dtype):
    x = make((2, 5, 3, head_dim), dtype, seed=head_dim)
    cos, sin = tables(5, head_dim // 2)
    check(x, cos, sin, seed=head_dim)


def test_fp16_single_head_single_position():
    x = make((1, 1, 1, 8), torch.float16, seed=1)
    cos, sin = tables(1, 4)
    check(x, cos, sin)
    x = make((3, 4, 5, 10), torch.float16, seed=2)
    cos, sin = tables(4, 5)
    check(x, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_views_and_gqa(dtype):
    """q and k as non-contiguous slices of one fused projection; k has fewer heads (GQA)."""
    batch, seq, n_q, n_kv, head_dim = 2, 6, 4, 2, 8
    fused = make((batch, seq, (n_q + 2 * n_kv) * head_dim), dtype, seed=3)
    heads = fused.view(batch, seq, n_q + 2 * n_kv, head_dim)
    q, k = heads[:, :, :n_q], heads[:, :, n_q:n_q + n_kv]
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = tables(seq, head_dim // 2)
    check(q, cos, sin, seed=4)
    check(k, cos, sin, seed=5)
    # The gradient flows back into the fused tensor through the views.
    leaf = fused.detach().clone().requires_grad_(True)
    h = leaf.view(batch, seq, n_q + 2 * n_kv, head_dim)
    out_q = rotary(h[:, :, :n_q], cos, sin, impl="triton")
    out_k = rotary(h[:, :, n_q:n_q + n_kv], cos, sin, impl="triton")
    (out_q.float().square().sum() + out_k.float().sum()).backward()
    grad = leaf.grad.view(batch, seq, n_q + 2 * n_kv, head_dim)
    assert torch.all(grad[:, :, n_q + n_kv:] == 0)
    expected_k = reference_grad(torch.ones_like(k), cos, sin)
    assert_close_to_reference(grad[:, :, n_q:n_q + n_kv], expected_k, atol=dtype_atol(dtype, 16))


def test_transposed_layout_and_non_contiguous_tables():
    """x stored as [batch, heads, seq, head_dim] and viewed transposed; tables sliced from full-width ones."""
    x = make((2, 3, 7, 12), torch.float32, seed=6).transpose(1, 2)  # [2, 7, 3, 12], strided
    full_cos, full_sin = tables(7, 6)
    full_cos, full_sin = torch.cat([full_cos] * 2, -1), torch.cat([full_sin] * 2, -1)
    cos, sin = full_cos[:, :6], full_sin[:, :6]
    assert not cos.is_contiguous()
    check(x, cos, sin, seed=6)


@pytest.mark.parametrize("offset", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_position_offset(offset, dtype):
    x = make((2, 4, 2, 8), dtype, seed=offset)
    cos, sin = tables(4 + offset + 3, 4)
    check(x, cos, sin, offset=offset, seed=offset)
    # Row s with offset o is row s + o of a longer sequence.
    longer = torch.cat([make((2, offset, 2, 8), dtype, seed=99), x], dim=1)
    full = rotary(longer, cos, sin, impl="triton")
    assert torch.equal(rotary(x, cos, sin, impl="triton", position_offset=offset), full[:, offset:])


def test_torch_path_matches_the_full_width_formula():
    """rotary_torch with half tables is bit-identical to x * cos + rotate_half(x) * sin (the model's old code)."""
    x = make((2, 5, 3, 8), torch.bfloat16, seed=8)
    cos, sin = tables(5, 4)
    full_cos, full_sin = torch.cat([cos] * 2, -1)[None, :, None], torch.cat([sin] * 2, -1)[None, :, None]
    wide = x.float()
    x1, x2 = wide.chunk(2, -1)
    old = (wide * full_cos + torch.cat((-x2, x1), -1) * full_sin).to(x.dtype)
    assert torch.equal(rotary_torch(x, cos, sin), old)


def test_rotation_preserves_norm_and_bad_inputs_raise():
    x = make((1, 3, 2, 8), torch.float32, seed=9)
    cos, sin = tables(3, 4)
    y = rotary(x, cos, sin, impl="triton")
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=1e-6)
    assert math.isfinite(y.sum().item())
    with pytest.raises(ValueError):
        rotary(x, cos[:2], sin[:2], impl="triton")  # table shorter than the sequence
    with pytest.raises(ValueError):
        rotary(x, cos, sin, impl="triton", position_offset=1)  # offset runs past the table
    with pytest.raises(ValueError):
        rotary(x[..., :7], cos, sin, impl="triton")  # odd head_dim
    with pytest.raises(ValueError):
        rotary(x, torch.cat([cos] * 2, -1), torch.cat([sin] * 2, -1), impl="triton")  # full-width tables
