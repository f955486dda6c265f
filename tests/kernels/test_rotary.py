"""Rotary kernel (impl="triton", interpreted) and its torch twin against fp64 formulas written here:
tables shared by the batch ([positions, D / 2], with a position offset) and per-row tables ([batch, seq,
D / 2], per-token positions such as packed sequences whose position ids restart)."""
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
    """fp64 truth: cat(x1 c - x2 s, x2 c + x1 s) with the fp32 tables (exactly representable in fp64);
    3-D tables [batch, seq, D / 2] rotate row b, position s by cos[b, s]."""
    x64 = x.detach().double()
    half = x.shape[-1] // 2
    if cos.dim() == 3:
        c, s = cos.double()[:, :, None, :], sin.double()[:, :, None, :]
    else:
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


# --------------------------------------------------------------------------------------------------
# Per-row tables [batch, seq, head_dim // 2]: per-token positions
# --------------------------------------------------------------------------------------------------
def restarting_positions(batch, seq, seed):
    """Position ids [batch, seq] of packed documents: each row restarts at 0 at random document starts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(batch, seq, dtype=torch.long)
    for b in range(batch):
        starts = {0} | set(torch.randint(1, seq, (2,), generator=g).tolist())
        pos = 0
        for s in range(seq):
            pos = 0 if s in starts else pos + 1
            ids[b, s] = pos
    return ids


def test_per_row_tables_equal_to_the_shared_table_when_every_row_is_the_same():
    x = make((3, 5, 2, 8), torch.bfloat16, seed=20)
    cos, sin = tables(5, 4)
    cos3, sin3 = cos[None].repeat(3, 1, 1), sin[None].repeat(3, 1, 1)
    for impl in ("triton", "torch"):
        assert torch.equal(rotary(x, cos3, sin3, impl=impl), rotary(x, cos, sin, impl=impl)), impl
    # an expanded table (batch stride 0) is a 3-D table too
    cos_e, sin_e = cos[None].expand(3, 5, 4), sin[None].expand(3, 5, 4)
    assert torch.equal(rotary(x, cos_e, sin_e, impl="triton"), rotary(x, cos, sin, impl="triton"))


@pytest.mark.parametrize("head_dim", [2, 14])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_row_tables_from_restarting_position_ids(head_dim, dtype):
    batch, seq = 3, 9
    ids = restarting_positions(batch, seq, seed=head_dim)
    assert (ids == 0).sum() > batch and not torch.equal(ids[0], ids[1])  # restarts inside rows, rows differ
    cos, sin = tables(seq, head_dim // 2)
    cos3, sin3 = cos[ids], sin[ids]  # [batch, seq, D / 2], as the model gathers them
    x = make((batch, seq, 3, head_dim), dtype, seed=21 + head_dim)
    check(x, cos3, sin3, seed=head_dim)
    if head_dim != 14 or dtype != torch.bfloat16:
        return
    # row b, position s is rotated as position ids[b, s] of a shared table (bit for bit)
    y = rotary(x, cos3, sin3, impl="triton")
    for b in range(batch):
        for s in range(seq):
            alone = rotary(x[b:b + 1, s:s + 1], cos, sin, impl="triton", position_offset=int(ids[b, s]))
            assert torch.equal(y[b:b + 1, s:s + 1], alone), (b, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_row_tables_with_fused_qkv_views_and_strided_tables(dtype):
    """q, k non-contiguous views of a fused projection; the per-row tables sliced from wider ones."""
    batch, seq, n_q, n_kv, head_dim = 2, 6, 4, 2, 8
    fused = make((batch, seq, (n_q + 2 * n_kv) * head_dim), dtype, seed=30)
    heads = fused.view(batch, seq, n_q + 2 * n_kv, head_dim)
    q, k = heads[:, :, :n_q], heads[:, :, n_q:n_q + n_kv]
    ids = restarting_positions(batch, seq, seed=31)
    cos, sin = tables(seq, head_dim // 2)
    wide_cos, wide_sin = torch.cat([cos[ids]] * 2, -1), torch.cat([sin[ids]] * 2, -1)
    cos3, sin3 = wide_cos[..., :head_dim // 2], wide_sin[..., :head_dim // 2]
    assert not q.is_contiguous() and not k.is_contiguous() and not cos3.is_contiguous()
    check(q, cos3, sin3, seed=32)
    check(k, cos3, sin3, seed=33)


def test_per_row_tables_bad_inputs_raise():
    x = make((2, 3, 2, 8), torch.float32, seed=40)
    cos, sin = tables(3, 4)
    cos3, sin3 = cos[None].repeat(2, 1, 1), sin[None].repeat(2, 1, 1)
    for impl in ("triton", "torch"):
        with pytest.raises(ValueError, match="position_offset"):
            rotary(x, cos3, sin3, impl=impl, position_offset=1)
        with pytest.raises(ValueError):
            rotary(x, cos3[:1], sin3[:1], impl=impl)  # batch 1 table for batch 2
        with pytest.raises(ValueError):
            rotary(x[:, :2], cos3, sin3, impl=impl)  # 3-D tables must match seq exactly
        with pytest.raises(ValueError):
            rotary(x, cos3, sin, impl=impl)  # one 3-D, one 2-D
