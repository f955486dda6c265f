"""RMSNorm: y = weight * (x * rstd).to(x.dtype) with rstd = 1 / sqrt(mean(x^2) + eps), stats in fp32.

Layout (Liger's shape): the Triton kernels, plain launchers, the custom ops wrapping them, then
the functional API ``rms_norm(x, weight, eps, impl="auto")``, with ``rms_norm_torch`` the PyTorch
implementation (and the reference semantics the kernel follows).

The Triton path is two torch.library custom ops, registered when this module is imported (their
fake and autograd registrations need no triton; only running them does):
- ``megacpm::rms_norm_forward(x, weight, eps) -> (y, rstd)``: y contiguous with x's shape in
  ``promote_types(weight.dtype, x.dtype)``, rstd fp32 [rows] (rows: the product of x's leading dims);
- ``megacpm::rms_norm_backward(dy, x, weight, rstd, need_dweight) -> (dx, dweight)``: dx contiguous
  in x's dtype; dweight [hidden] in weight's dtype, or an empty [0] placeholder when
  ``need_dweight`` is False (the autograd formula asks for it only when weight needs a gradient).

Semantics, identical on both paths:
- the statistics are computed in (at least) fp32; the normalised value is cast back to x's dtype
  before the gain is applied, so the output dtype is ``torch.promote_types(weight.dtype, x.dtype)``
  (fp32 weight and bf16 x give an fp32 output, as the torch code does);
- the forward saves 1/rms per row (fp32); the backward gives dx (x's dtype) and dweight (weight's
  dtype), dweight summed from per-program fp32 partial rows (no atomics).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .dispatch import TRITON_DTYPES, tl, triton, use_triton
from .launch import launch_settings, round_bf16



# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if triton is not None:
    from .casting import cast_rne as _cast

    @triton.jit
    def _rms_norm_forward_kernel(
        X, W, Y, RSTD,
        stride_x_row, stride_x_col, stride_y_row, stride_y_col, stride_w,
        n_cols, eps,
        BLOCK_SIZE: tl.constexpr, ROUND_BF16: tl.constexpr,
    ):
        """One row per program: y = w * (x * rstd).to(x.dtype), rstd = 1/sqrt(mean(x^2) + eps)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x_row + cols * stride_x_col, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols * stride_w, mask=mask, other=0.0).to(tl.float32)
        mean_sq = tl.sum(x * x, axis=0) / n_cols
        rstd = 1.0 / tl.sqrt(mean_sq + eps)
        tl.store(RSTD + row, rstd)
        # The normalised value is rounded to x's dtype before the gain, as the torch code does.
        normed = _cast(x * rstd, X.dtype.element_ty, ROUND_BF16).to(tl.float32)
        y = w * normed
        tl.store(Y + row * stride_y_row + cols * stride_y_col, _cast(y, Y.dtype.element_ty, ROUND_BF16), mask=mask)

    @triton.jit
    def _rms_norm_backward_kernel(
        DY, X, W, RSTD, DX, DW_PARTIAL,
        stride_dy_row, stride_dy_col, stride_x_row, stride_x_col, stride_dx_row, stride_dx_col,
        stride_w, stride_dwp_row,
        n_rows, n_cols, rows_per_program,
        BLOCK_SIZE: tl.constexpr, ROUND_BF16: tl.constexpr,
    ):
        """Rows [pid * rows_per_program, ...) of dx, and one fp32 partial row of dweight.

        With n = x * rstd and g = dy * w: dx = rstd * (g - n * mean(g * n)); dweight += dy * n.
        """
        pid = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        w = tl.load(W + cols * stride_w, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        for row in range(row_start, row_end):
            dy = tl.load(DY + row * stride_dy_row + cols * stride_dy_col, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + row * stride_x_row + cols * stride_x_col, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row).to(tl.float32)
            normed = x * rstd
            g = dy * w
            dot = tl.sum(g * normed, axis=0) / n_cols
            dx = rstd * (g - normed * dot)
            tl.store(DX + row * stride_dx_row + cols * stride_dx_col, _cast(dx, DX.dtype.element_ty, ROUND_BF16),
                     mask=mask)
            dw_acc += dy * normed
        tl.store(DW_PARTIAL + pid * stride_dwp_row + cols, dw_acc, mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype not in TRITON_DTYPES or weight.dtype not in TRITON_DTYPES:
        raise TypeError(f"rms_norm (triton): x and weight must be fp32, fp16 or bf16, got {x.dtype} and {weight.dtype}")
    if weight.dim() != 1 or x.dim() < 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x on {x.device} and weight on {weight.device}")


def _assert_column_offsets_fit(t: torch.Tensor) -> None:
    # Row offsets are int64 in the kernels; column offsets (cols * stride) stay int32.
    assert (t.shape[1] - 1) * abs(t.stride(1)) < 2 ** 31, (t.shape, t.stride())


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Launch the forward kernel. Returns (y with x's shape, rstd fp32 [rows])."""
    _check(x, weight)
    n_cols = x.shape[-1]
    x2d = x.reshape(-1, n_cols)
    n_rows = x2d.shape[0]
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if n_rows > 0 and n_cols > 0:
        block, num_warps = launch_settings(n_cols, what="rms_norm (hidden size)")
        assert block >= n_cols
        _assert_column_offsets_fit(x2d)
        _rms_norm_forward_kernel[(n_rows,)](
            x2d, weight, y, rstd,
            x2d.stride(0), x2d.stride(1), y.stride(0), y.stride(1), weight.stride(0),
            n_cols, float(eps),
            BLOCK_SIZE=block, ROUND_BF16=round_bf16(), num_warps=num_warps,
        )
    return y.view(x.shape), rstd


def _num_backward_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        target = torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another: a few are enough to test the split
        target = 4
    return max(1, min(n_rows, target))


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      need_dweight: bool = True):
    """Launch the backward kernel. Returns (dx in x's dtype, dweight in weight's dtype or None)."""
    n_cols = x.shape[-1]
    x2d = x.reshape(-1, n_cols)
    dy2d = dy.reshape(-1, n_cols)
    n_rows = x2d.shape[0]
    assert dy2d.shape == x2d.shape, (dy.shape, x.shape)
    assert rstd.shape == (n_rows,) and rstd.dtype == torch.float32 and rstd.is_contiguous()
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0 or n_cols == 0:
        dweight = torch.zeros_like(weight) if need_dweight else None
        return dx.view(x.shape), dweight
    block, num_warps = launch_settings(n_cols, what="rms_norm (hidden size)")
    _assert_column_offsets_fit(x2d)
    _assert_column_offsets_fit(dy2d)
    n_programs = _num_backward_programs(n_rows, x.device)
    rows_per_program = triton.cdiv(n_rows, n_programs)
    n_programs = triton.cdiv(n_rows, rows_per_program)  # no program left without rows
    partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device)
    assert partial.stride(1) == 1
    _rms_norm_backward_kernel[(n_programs,)](
        dy2d, x2d, weight, rstd, dx, partial,
        dy2d.stride(0), dy2d.stride(1), x2d.stride(0), x2d.stride(1), dx.stride(0), dx.stride(1),
        weight.stride(0), partial.stride(0),
        n_rows, n_cols, rows_per_program,
        BLOCK_SIZE=block, ROUND_BF16=round_bf16(), num_warps=num_warps,
    )
    dweight = partial.sum(dim=0).to(weight.dtype) if need_dweight else None
    return dx.view(x.shape), dweight


# --------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------
# Why custom ops and not a torch.autograd.Function: under torch.compile, Dynamo traces into an
# autograd.Function and the Python launcher inside it (launch settings, device queries, the Triton
# launch), where a compiled decoder block can break its graph. A torch.library custom op is one
# opaque node of the graph instead: its fake implementation gives the outputs' shapes, dtypes and
# devices at trace time, and its autograd formula (register_autograd) is what AOTAutograd
# differentiates. They are registered once, when this module is imported.
def _require_triton(op: str) -> None:
    if triton is None:
        raise RuntimeError(f"megacpm::{op} runs a Triton kernel and the triton package is not installed")


def _rows(x: torch.Tensor):
    return math.prod(x.shape[:-1])


@torch.library.custom_op("megacpm::rms_norm_forward", mutates_args=())
def rms_norm_forward_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Triton forward (rms_norm_forward) as a custom op: (y, rstd fp32 [rows])."""
    _require_triton("rms_norm_forward")
    return rms_norm_forward(x, weight, eps)


@rms_norm_forward_op.register_fake
def _rms_norm_forward_fake(x: torch.Tensor, weight: torch.Tensor, eps: float):
    _check(x, weight)
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty((_rows(x),), dtype=torch.float32, device=x.device)
    return y, rstd


@torch.library.custom_op("megacpm::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                         need_dweight: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Triton backward (rms_norm_backward) as a custom op: (dx, dweight, or an empty [0] placeholder)."""
    _require_triton("rms_norm_backward")
    dx, dweight = rms_norm_backward(dy, x, weight, rstd, need_dweight=need_dweight)
    if dweight is None:  # a custom op returns tensors, never None
        dweight = weight.new_empty((0,))
    return dx, dweight


@rms_norm_backward_op.register_fake
def _rms_norm_backward_fake(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_dweight: bool):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dweight = torch.empty(weight.shape if need_dweight else (0,), dtype=weight.dtype, device=weight.device)
    return dx, dweight


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _eps = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _rms_norm_backward_formula(ctx, dy: torch.Tensor, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dx or need_dw):
        return None, None, None
    dx, dweight = rms_norm_backward_op(dy, x, weight, rstd, need_dw)
    return (dx if need_dx else None), (dweight if need_dw else None), None


rms_norm_forward_op.register_autograd(_rms_norm_backward_formula, setup_context=_rms_norm_setup_context)


# --------------------------------------------------------------------------------------------------
# PyTorch implementation and the functional API
# --------------------------------------------------------------------------------------------------
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), statistics in fp32, normalised value back in x's dtype."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension of x ([..., hidden]) with gain ``weight`` ([hidden]).

    ``impl``: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, otherwise torch; also torch for
    dtypes the kernel does not take, e.g. fp64), "triton" or "torch".
    """
    if use_triton(impl, x, weight):
        if impl == "auto" and (x.dtype not in TRITON_DTYPES or weight.dtype not in TRITON_DTYPES):
            return rms_norm_torch(x, weight, eps)
        return rms_norm_forward_op(x, weight, float(eps))[0]
    return rms_norm_torch(x, weight, eps)
