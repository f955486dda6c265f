"""Grouped GEMM for mixture-of-experts: y[rows of group e] = x[rows of e] @ weight[e].T, fp32 accumulation.

``grouped_matmul(x, weight, counts, impl="auto")``:
- x [rows, K] with its rows sorted by group (expert), counts integer [E] rows per group (zeros allowed,
  summing to rows), weight [E, N, K] (one nn.Linear weight per expert); returns y [rows, N] in x's
  dtype. Differentiable in x and weight: dx = dy_e @ W_e, dW_e = dy_e^T @ x_e (zero for a group
  without rows), both accumulated in fp32, dx in x's dtype, dW in weight's.
- x and weight must have the same dtype, as for torch.matmul. Under autocast (for x's device type)
  both are cast to the autocast dtype first, as autocast casts a matmul's inputs, and the kernels run
  with autocast off (fp64 is never cast, as autocast leaves it).

Layout: the Triton kernels, the launchers, the autograd.Function, the PyTorch implementation
(``grouped_matmul_torch``, a loop of one matmul per group with rows: the reference semantics) and the
functional API. The Triton path:
- group metadata, computed on the device from ``counts`` with no host sync (``_group_meta``): an int64
  [4, E] tensor of each group's first row, end row, first row tile and end row tile, the row tiles of
  BLOCK_M rows numbered group after group (a group of c rows has ceil(c / BLOCK_M) tiles);
- forward: ONE launch over (row tiles, N tiles). The grid has ceil(rows / BLOCK_M) + E row-tile
  programs (an upper bound of the real count that needs no sync); program t finds its group as the
  number of groups whose tiles end at or before t (a vector compare of the E tile ends), returns at
  once past the last tile, and masks the rows past its group's end (ragged boundaries);
- backward dx: the same kernel with the weight read transposed (strides swapped): dx_e = dy_e @ W_e;
- backward dW: one launch over (N tiles, K tiles, E), each program reducing over its group's rows in
  BLOCK_M chunks; a group without rows stores zeros.
Under Triton's CPU interpreter every load is converted to fp32 before tl.dot (bf16 dots on raw bits are
wrong there) and bf16 stores are rounded to nearest even by hand (megacpm.kernels.casting); on a GPU 16-bit
operands go to tl.dot as they are (tensor cores, fp32 accumulator) and fp32 operands use TF32 exactly
when ``torch.backends.cuda.matmul.allow_tf32`` says torch's own matmul would.

The sum of counts is checked against rows (and counts for negatives) where that costs no device sync:
counts on the CPU. On CUDA a device-side assert checks it, and the kernels clamp every group's rows
to [0, rows), so wrong counts cannot read or write out of bounds.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .dispatch import TRITON_DTYPES, interpreter_enabled, tl, triton, use_triton
from .launch import MIN_BLOCK, next_power_of_2, round_bf16


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if triton is not None:
    from .casting import cast_rne as _cast

    @triton.jit
    def _grouped_mm_kernel(
        A, B, C, META,
        n_rows, n_reduce, n_out, n_groups,
        stride_a_row, stride_a_col, stride_b_group, stride_b_reduce, stride_b_out, stride_c_row, stride_c_col,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
    ):
        """C[rows of g] = A[rows of g] @ B_g with B_g[r, n] at B + g*stride_b_group + r*stride_b_reduce
        + n*stride_b_out; one BLOCK_M x BLOCK_N tile of C per program (module docstring)."""
        tile = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1)
        groups = tl.arange(0, BLOCK_E)
        tile_ends = tl.load(META + 3 * n_groups + groups, mask=groups < n_groups, other=0)
        finished = (tile_ends <= tile) & (groups < n_groups)
        group = tl.sum(finished.to(tl.int32), axis=0)  # the groups whose tiles all come before this one
        if group >= n_groups:  # past the last real tile (the grid is an upper bound)
            return
        group64 = group.to(tl.int64)
        row_start = tl.load(META + group64)
        row_end = tl.minimum(tl.load(META + n_groups + group64), n_rows)
        tile_start = tl.load(META + 2 * n_groups + group64)
        rows = row_start + (tile - tile_start) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = (rows < row_end) & (rows >= 0)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = cols < n_out
        a_rows = A + rows[:, None] * stride_a_row
        b_group = B + group64 * stride_b_group + cols[None, :].to(tl.int64) * stride_b_out
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, n_reduce, BLOCK_K):
            red = r0 + tl.arange(0, BLOCK_K)
            mask_r = red < n_reduce
            a = tl.load(a_rows + red[None, :].to(tl.int64) * stride_a_col, mask=mask_m[:, None] & mask_r[None, :],
                        other=0.0)
            b = tl.load(b_group + red[:, None].to(tl.int64) * stride_b_reduce, mask=mask_r[:, None] & mask_n[None, :],
                        other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        c_ptrs = C + rows[:, None] * stride_c_row + cols[None, :].to(tl.int64) * stride_c_col
        tl.store(c_ptrs, _cast(acc, C.dtype.element_ty, ROUND_BF16), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _grouped_dweight_kernel(
        DY, X, DW, META,
        n_rows, n_out, n_in, n_groups,
        stride_dy_row, stride_dy_col, stride_x_row, stride_x_col, stride_dw_group, stride_dw_out, stride_dw_in,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
    ):
        """DW[g, n-tile, k-tile] = sum over the rows of group g of DY[row, n] * X[row, k] (fp32)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        group = tl.program_id(2).to(tl.int64)
        row_start = tl.maximum(tl.load(META + group), 0)
        row_end = tl.minimum(tl.load(META + n_groups + group), n_rows)
        outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ins = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_n = outs < n_out
        mask_k = ins < n_in
        dy_cols = DY + outs[:, None].to(tl.int64) * stride_dy_col
        x_cols = X + ins[None, :].to(tl.int64) * stride_x_col
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            mask_m = rows < row_end
            dy_t = tl.load(dy_cols + rows[None, :] * stride_dy_row, mask=mask_n[:, None] & mask_m[None, :], other=0.0)
            x = tl.load(x_cols + rows[:, None] * stride_x_row, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if UPCAST:
                dy_t = dy_t.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(dy_t, x, acc, input_precision=PRECISION)
        dw_ptrs = DW + group * stride_dw_group + outs[:, None].to(tl.int64) * stride_dw_out \
            + ins[None, :].to(tl.int64) * stride_dw_in
        tl.store(dw_ptrs, _cast(acc, DW.dtype.element_ty, ROUND_BF16), mask=mask_n[:, None] & mask_k[None, :])


# --------------------------------------------------------------------------------------------------
# Checks, launch settings, launchers
# --------------------------------------------------------------------------------------------------
class Blocks(NamedTuple):
    """Tile sizes and launch options of the three launches (one BLOCK_M for all: the group metadata's)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


INTERPRETER_BLOCKS = Blocks(16, 16, 16, 4, 1)  # tl.dot's smallest tile; the interpreter runs programs one by one
GPU_BLOCKS_16BIT = Blocks(64, 128, 64, 4, 3)  # 48 KiB of operands per stage (bf16, fp16); not tuned on a GPU yet
GPU_BLOCKS_FP32 = Blocks(64, 64, 32, 4, 3)


def launch_blocks(dtype: torch.dtype) -> Blocks:
    """The tile sizes for ``dtype``: tiny under the interpreter, the GPU ones otherwise."""
    if interpreter_enabled():
        return INTERPRETER_BLOCKS
    return GPU_BLOCKS_FP32 if dtype == torch.float32 else GPU_BLOCKS_16BIT


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: for fp32 what torch's own matmul would do (TF32 only when allowed)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _shapes(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> str:
    return (f"x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}, "
            f"counts {tuple(counts.shape)} {counts.dtype}")


def check_inputs(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> None:
    """One ValueError naming every shape and dtype when x [rows, K], weight [E, N, K] and counts [E] do
    not fit together (or x and weight differ in dtype, or counts is not an integer tensor); on CPU counts
    also their sum and sign (no device sync)."""
    problem = None
    if x.dim() != 2 or weight.dim() != 3 or counts.dim() != 1:
        problem = "expected x [rows, K], weight [E, N, K], counts [E]"
    elif weight.shape[2] != x.shape[1]:
        problem = f"weight's K ({weight.shape[2]}) is not x's ({x.shape[1]})"
    elif counts.shape[0] != weight.shape[0]:
        problem = f"counts has {counts.shape[0]} groups, weight {weight.shape[0]}"
    elif x.dtype != weight.dtype:
        problem = "x and weight must have the same dtype"
    elif counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        problem = "counts must be an integer tensor"
    elif x.device != weight.device:
        problem = f"x on {x.device}, weight on {weight.device}"
    elif counts.device.type == "cpu":
        if (counts < 0).any():
            problem = f"negative counts {counts.tolist()}"
        elif int(counts.sum()) != x.shape[0]:
            problem = f"counts sum to {int(counts.sum())}, x has {x.shape[0]} rows"
    if problem is not None:
        raise ValueError(f"grouped_matmul: {problem}: {_shapes(x, weight, counts)}")


def _group_meta(counts: torch.Tensor, block_m: int, rows: int) -> torch.Tensor:
    """int64 [4, E] on counts' device, no host sync: row start, row end, row-tile start, row-tile end."""
    counts = counts.to(torch.int64)
    if counts.is_cuda:
        torch._assert_async((counts >= 0).all() & (counts.sum() == rows),
                            "grouped_matmul: counts must be >= 0 and sum to x's rows")
    row_end = torch.cumsum(counts, 0)
    tiles = torch.div(counts + (block_m - 1), block_m, rounding_mode="floor")
    tile_end = torch.cumsum(tiles, 0)
    return torch.stack((row_end - counts, row_end, tile_end - tiles, tile_end)).contiguous()


def _row_tiles_bound(rows: int, groups: int, block_m: int) -> int:
    """At least sum_e ceil(counts_e / block_m), whatever the counts: ceil(rows / block_m) + E - 1 (>= 1)."""
    return max(1, triton.cdiv(rows, block_m) + groups - 1)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, b_strides, n_reduce: int, n_out: int, meta: torch.Tensor,
                out_dtype: torch.dtype, blocks: Blocks, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out [rows, n_out] = per group a_g @ B_g, B_g[r, n] at b + g*b_strides[0] + r*b_strides[1] + n*b_strides[2]
    (``out`` given: written in place, only the rows of the groups; the tests' check of the row masks)."""
    rows, groups = a.shape[0], meta.shape[1]
    if out is None:
        out = torch.empty((rows, n_out), dtype=out_dtype, device=a.device)
    assert out.shape == (rows, n_out) and out.dtype == out_dtype, (out.shape, out.dtype)
    if rows == 0 or n_out == 0:
        return out
    if n_reduce == 0:
        return out.zero_()
    grid = (_row_tiles_bound(rows, groups, blocks.block_m), triton.cdiv(n_out, blocks.block_n))
    _grouped_mm_kernel[grid](
        a, b, out, meta,
        rows, n_reduce, n_out, groups,
        a.stride(0), a.stride(1), b_strides[0], b_strides[1], b_strides[2], out.stride(0), out.stride(1),
        BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
        BLOCK_E=max(MIN_BLOCK, next_power_of_2(groups)), UPCAST=interpreter_enabled(),
        PRECISION=_dot_precision(a.dtype), ROUND_BF16=round_bf16(),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return out


def grouped_matmul_forward(x: torch.Tensor, weight: torch.Tensor, meta: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """The Triton forward: y [rows, N] = x_g @ weight[g].T per group."""
    _, n, k = weight.shape
    return _grouped_mm(x, weight, (weight.stride(0), weight.stride(2), weight.stride(1)), k, n, meta, x.dtype, blocks)


def grouped_matmul_backward_x(dy: torch.Tensor, weight: torch.Tensor, meta: torch.Tensor, blocks: Blocks,
                              dtype: torch.dtype) -> torch.Tensor:
    """dx [rows, K] = dy_g @ weight[g] per group: the forward kernel with the weight read transposed."""
    _, n, k = weight.shape
    return _grouped_mm(dy, weight, (weight.stride(0), weight.stride(1), weight.stride(2)), n, k, meta, dtype, blocks)


def grouped_matmul_backward_weight(dy: torch.Tensor, x: torch.Tensor, meta: torch.Tensor, blocks: Blocks,
                                   dtype: torch.dtype) -> torch.Tensor:
    """dW [E, N, K] = dy_g^T @ x_g per group (zeros for a group without rows), fp32 accumulation."""
    rows, n, k, groups = x.shape[0], dy.shape[1], x.shape[1], meta.shape[1]
    dw = torch.empty((groups, n, k), dtype=dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    if rows == 0:
        return dw.zero_()
    grid = (triton.cdiv(n, blocks.block_n), triton.cdiv(k, blocks.block_k), groups)
    assert grid[1] < 65536 and grid[2] < 65536, grid
    _grouped_dweight_kernel[grid](
        dy, x, dw, meta,
        rows, n, k, groups,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
        UPCAST=interpreter_enabled(), PRECISION=_dot_precision(x.dtype), ROUND_BF16=round_bf16(),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return dw


class GroupedMatmulFunction(torch.autograd.Function):
    """The Triton path: the forward kernel, then the dx and dW kernels on the same group metadata."""

    @staticmethod
    def forward(ctx, x, weight, counts, blocks):
        meta = _group_meta(counts.to(x.device), blocks.block_m, x.shape[0])
        ctx.blocks = blocks
        ctx.save_for_backward(x, weight, meta)
        return grouped_matmul_forward(x, weight, meta, blocks)

    @staticmethod
    def backward(ctx, dy):
        x, weight, meta = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy = dy.to(x.dtype)
        dx = grouped_matmul_backward_x(dy, weight, meta, ctx.blocks, x.dtype) if need_x else None
        dw = grouped_matmul_backward_weight(dy, x, meta, ctx.blocks, weight.dtype) if need_w else None
        return dx, dw, None, None


# --------------------------------------------------------------------------------------------------
# PyTorch implementation and the functional API
# --------------------------------------------------------------------------------------------------
def grouped_matmul_torch(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One matmul per group with rows (a host sync on counts): the reference semantics, autograd by torch.

    The groups' weights are taken by one ``unbind``: its backward stacks the groups' gradients once,
    where indexing ``weight[e]`` per group would back-propagate a full-size zero gradient for each."""
    pieces, start = [], 0
    per_group = weight.unbind(0)
    for group, count in enumerate(counts.tolist()):
        if count:
            pieces.append(x[start:start + count] @ per_group[group].t())
        start += count
    if not pieces:  # no rows at all: an empty [0, N] that still depends on x and weight (zero gradients)
        return x @ weight.sum(0).t()
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for x's device type when autocast is on there, else None."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """t in the autocast dtype, as autocast casts a matmul input (fp16, bf16, fp32; never fp64)."""
    if dtype is None or t.dtype not in TRITON_DTYPES:
        return t
    return t.to(dtype)


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """y [rows, N] with y[rows of group e] = x[rows of e] @ weight[e].T (module docstring).

    x [rows, K] sorted by group, weight [E, N, K], counts integer [E] summing to rows (zeros allowed).
    ``impl``: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, otherwise torch; also torch for dtypes
    the kernels do not take, e.g. fp64), "triton" or "torch".
    """
    cast = _autocast_dtype(x)  # differentiable casts: the gradients come back in each input's dtype
    x, weight = _autocast(x, cast), _autocast(weight, cast)
    check_inputs(x, weight, counts)
    if not use_triton(impl, x, weight):
        return grouped_matmul_torch(x, weight, counts)
    if x.dtype not in TRITON_DTYPES:
        if impl == "auto":
            return grouped_matmul_torch(x, weight, counts)
        raise TypeError(f"grouped_matmul (triton): x and weight must be fp32, fp16 or bf16: {_shapes(x, weight, counts)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        return GroupedMatmulFunction.apply(x, weight, counts, launch_blocks(x.dtype))
