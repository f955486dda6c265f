"""Rotary position embedding (rotate-half convention) as a Triton kernel with a PyTorch twin.

    out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin),   x1, x2 = the two halves of head_dim,

for x [batch, seq, heads, head_dim] and fp32 tables cos, sin either shared by the batch, [>= seq +
position_offset, head_dim // 2] (position s of x uses table row s + position_offset), or per batch row,
[batch, seq, head_dim // 2] (row b, position s uses cos[b, s]; position_offset must be 0): the tables
of per-token positions, e.g. packed sequences whose position ids [batch, seq] restart at 0, gathered
from a 2-D table as cos2d[position_ids]. The math runs in fp32 and the result has x's dtype.
The backward is the same rotation with -sin. Any strides are taken (q and k as views of a fused
qkv projection; the tables too, and a 3-D table's batch stride may be 0, e.g. an expand); GQA needs
nothing special (k with fewer heads is another call). One kernel serves both table layouts: a 2-D
table is a 3-D one with batch stride 0.

Layout (Liger's shape): the Triton kernel, a plain launcher, the custom op wrapping it, then the
functional API ``rotary(x, cos, sin, impl="auto", position_offset=0)``; ``rotary_torch`` is the
PyTorch implementation.

The Triton path is the torch.library custom op ``megacpm::rotary(x, cos, sin, position_offset,
backward) -> y`` (y contiguous, x's shape and dtype; cos, sin 2-D or 3-D as above; ``backward``
rotates by -sin), registered when
this module is imported (its fake and autograd registrations need no triton; only running it does).
Its gradient is the same op with ``backward`` flipped, so it is differentiable any number of times.
"""
from __future__ import annotations

import torch

from .dispatch import TRITON_DTYPES, tl, triton, use_triton
from .launch import launch_settings, next_power_of_2, round_bf16



if triton is not None:
    from .casting import cast_rne as _cast

    @triton.jit
    def _rotary_kernel(
        X, COS, SIN, Y,
        stride_xb, stride_xs, stride_xh, stride_xd,
        stride_yb, stride_ys, stride_yh, stride_yd,
        stride_cb, stride_cs, stride_cd, stride_sb, stride_ss, stride_sd,
        seq_len, n_heads, half_dim, position_offset,
        BACKWARD: tl.constexpr, ROUND_BF16: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One (batch, position) per program, all heads as a [BLOCK_H, BLOCK_D] tile of half-rows.

        Forward: y1 = x1 c - x2 s, y2 = x2 c + x1 s. Backward (BACKWARD): the same with -s. The table
        row is COS + b * stride_cb + (s + position_offset) * stride_cs: stride_cb is 0 for a table
        shared by the batch (2-D), the table's batch stride for per-row tables (3-D, offset 0).
        """
        pid = tl.program_id(0).to(tl.int64)
        b = pid // seq_len
        s = pid % seq_len
        heads = tl.arange(0, BLOCK_H)[:, None]
        dims = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < n_heads) & (dims < half_dim)
        d_mask = tl.arange(0, BLOCK_D) < half_dim

        t = s + position_offset
        c_row = COS + b * stride_cb + t * stride_cs
        s_row = SIN + b * stride_sb + t * stride_ss
        c = tl.load(c_row + tl.arange(0, BLOCK_D) * stride_cd, mask=d_mask, other=0.0).to(tl.float32)
        sn = tl.load(s_row + tl.arange(0, BLOCK_D) * stride_sd, mask=d_mask, other=0.0).to(tl.float32)
        if BACKWARD:
            sn = -sn
        c = c[None, :]
        sn = sn[None, :]

        x_row = X + b * stride_xb + s * stride_xs + heads * stride_xh
        x1 = tl.load(x_row + dims * stride_xd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + (dims + half_dim) * stride_xd, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c - x2 * sn
        y2 = x2 * c + x1 * sn
        y_row = Y + b * stride_yb + s * stride_ys + heads * stride_yh
        tl.store(y_row + dims * stride_yd, _cast(y1, Y.dtype.element_ty, ROUND_BF16), mask=mask)
        tl.store(y_row + (dims + half_dim) * stride_yd, _cast(y2, Y.dtype.element_ty, ROUND_BF16), mask=mask)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_offset: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"rotary: x must be [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary: head_dim must be even, got {head_dim}")
    half = head_dim // 2
    batch, seq = x.shape[0], x.shape[1]
    if cos.dim() != sin.dim():
        raise ValueError(f"rotary: cos and sin must both be 2-D or both 3-D, got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() == 3:
            if tuple(table.shape) != (batch, seq, half):
                raise ValueError(f"rotary: a per-row {name} must be [batch, seq, head_dim // 2] = "
                                 f"{(batch, seq, half)}, got {tuple(table.shape)}")
        elif table.dim() != 2 or table.shape[1] != half:
            raise ValueError(f"rotary: {name} must be [seq, head_dim // 2 = {half}] or [batch, seq, "
                             f"head_dim // 2], got {tuple(table.shape)}")
        elif table.shape[0] < seq + position_offset:
            raise ValueError(f"rotary: {name} has {table.shape[0]} rows, needs seq + position_offset = "
                             f"{seq + position_offset}")
        if table.device != x.device:
            raise ValueError(f"rotary: {name} on {table.device}, x on {x.device}")
    if position_offset < 0:
        raise ValueError(f"rotary: position_offset must be >= 0, got {position_offset}")
    if cos.dim() == 3 and position_offset != 0:
        raise ValueError(f"rotary: per-row [batch, seq, head_dim // 2] tables take no position_offset "
                         f"(the positions are in the tables), got {position_offset}")


def _check_triton_dtypes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dtype not in TRITON_DTYPES or cos.dtype not in TRITON_DTYPES or sin.dtype not in TRITON_DTYPES:
        raise TypeError(f"rotary (triton): x, cos, sin must be fp32, fp16 or bf16, "
                        f"got {x.dtype}, {cos.dtype}, {sin.dtype}")


def rotary_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_offset: int = 0,
                  backward: bool = False) -> torch.Tensor:
    """Launch the kernel on any-strided x; returns a new contiguous tensor of x's shape and dtype."""
    _check(x, cos, sin, position_offset)
    _check_triton_dtypes(x, cos, sin)
    batch, seq, heads, head_dim = x.shape
    y = torch.empty((batch, seq, heads, head_dim), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    half = head_dim // 2
    block_h = next_power_of_2(heads)
    block_d, num_warps = launch_settings(half, min_block=1, rows=block_h)  # warps follow the whole tile
    assert block_h >= heads and block_d >= half
    # (batch, position) offsets are int64 in the kernel; offsets within one position stay int32.
    for t in (x, y):
        assert (heads - 1) * abs(t.stride(2)) + (head_dim - 1) * abs(t.stride(3)) < 2 ** 31, t.stride()
    # (batch stride, position stride, dim stride) of each table; a 2-D table is shared: batch stride 0.
    table_strides = [s for t in (cos, sin) for s in ((0, *t.stride()) if t.dim() == 2 else t.stride())]
    _rotary_kernel[(batch * seq,)](
        x, cos, sin, y,
        *x.stride(), *y.stride(),
        *table_strides,
        seq, heads, half, int(position_offset),
        BACKWARD=bool(backward), ROUND_BF16=round_bf16(),
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
    )
    return y


# Why a custom op and not a torch.autograd.Function: under torch.compile, Dynamo traces into an
# autograd.Function and the Python launcher inside it (launch settings, the Triton launch), where a
# compiled decoder block can break its graph. A torch.library custom op is one opaque node of the
# graph instead: its fake implementation gives the output's shape, dtype and device at trace time,
# and its autograd formula (register_autograd) is what AOTAutograd differentiates. It is registered
# once, when this module is imported.
@torch.library.custom_op("megacpm::rotary", mutates_args=())
def rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_offset: int,
              backward: bool) -> torch.Tensor:
    """The Triton rotation (rotary_launch) as a custom op; cos, sin [>= seq + position_offset, D / 2] or
    per-row [batch, seq, D / 2] (position_offset 0); ``backward`` rotates by -sin."""
    if triton is None:
        raise RuntimeError("megacpm::rotary runs a Triton kernel and the triton package is not installed")
    return rotary_launch(x, cos, sin, position_offset, backward=backward)


@rotary_op.register_fake
def _rotary_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_offset: int,
                 backward: bool) -> torch.Tensor:
    _check(x, cos, sin, position_offset)
    _check_triton_dtypes(x, cos, sin)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _rotary_setup_context(ctx, inputs, output):
    _x, cos, sin, position_offset, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.position_offset = position_offset
    ctx.backward = backward


def _rotary_backward_formula(ctx, dy: torch.Tensor):
    # The rotation is orthogonal: its transpose is the rotation by -sin. The tables get no gradient.
    cos, sin = ctx.saved_tensors
    dx = rotary_op(dy, cos, sin, ctx.position_offset, not ctx.backward) if ctx.needs_input_grad[0] else None
    return dx, None, None, None, None


rotary_op.register_autograd(_rotary_backward_formula, setup_context=_rotary_setup_context)


def rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 position_offset: int = 0) -> torch.Tensor:
    """PyTorch implementation: the rotation in (at least) fp32, the result in x's dtype. Tables as for
    ``rotary``: [>= seq + position_offset, D / 2] broadcast as [1, seq, 1, D / 2], or per-row
    [batch, seq, D / 2] broadcast as [batch, seq, 1, D / 2]."""
    _check(x, cos, sin, position_offset)
    seq, half = x.shape[1], x.shape[-1] // 2
    if cos.dim() == 3:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    else:
        cos = cos[position_offset: position_offset + seq][None, :, None, :]
        sin = sin[position_offset: position_offset + seq][None, :, None, :]
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = wide[..., :half], wide[..., half:]
    # Written as x1 c + (-x2) s so it is bit-identical to "x * cos + rotate_half(x) * sin".
    out = torch.cat((x1 * cos + (-x2) * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str = "auto",
           position_offset: int = 0) -> torch.Tensor:
    """Rotate x [batch, seq, heads, head_dim] by the half-width tables cos, sin: [>= seq +
    position_offset, head_dim // 2] shared by every batch row, or per-row [batch, seq, head_dim // 2]
    (row b, position s uses cos[b, s]: per-token positions, e.g. cos2d[position_ids]).

    ``impl``: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, otherwise torch; also torch for
    dtypes the kernel does not take, e.g. fp64), "triton" or "torch". ``position_offset`` (2-D tables
    only; must be 0 with 3-D ones, else ValueError): position s of x uses table row s +
    position_offset. The tables get no gradient.
    """
    position_offset = int(position_offset)
    if use_triton(impl, x, cos, sin):
        if impl == "auto" and any(t.dtype not in TRITON_DTYPES for t in (x, cos, sin)):
            return rotary_torch(x, cos, sin, position_offset)
        return rotary_op(x, cos, sin, position_offset, False)
    return rotary_torch(x, cos, sin, position_offset)
