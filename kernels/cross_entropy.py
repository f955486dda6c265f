"""Cross entropy of softmax(logits * logit_scale), in fp32, as a Triton kernel (and in PyTorch for the CPU).

    loss = cross_entropy(logits, labels, logit_scale=1.0, ignore_index=-100, reduction="mean",
                         z_loss=0.0, impl="auto")

Semantics (both implementations):
- logits [..., vocab] in fp32, fp16 or bf16; labels [...] integer. Everything is computed in fp32 on
  x = logits * logit_scale (muP's 1/m folded into the loss: a runtime fp32 value, so changing it
  recompiles nothing). The gradient carries the same factor.
- Per token: loss = lse(x) - x[label] + z_loss * lse(x)^2 (PaLM's z-loss, off by default).
- Tokens whose label is ``ignore_index`` contribute nothing to the loss and get a zero gradient.
- reduction "mean" divides by the number of non-ignored tokens; "sum"; "none" gives the per-token
  fp32 losses (0 at ignored tokens). A batch where every label is ignored gives loss 0 and zero
  gradients for "mean" (PyTorch gives NaN there): a fully-padded micro-batch must not poison a step.

Triton layout (as Liger-Kernel's): one program per row; the forward runs an online softmax over blocks
of the vocabulary (running max and rescaled sum), so any vocabulary size (256k and more) works with a
fixed block, and saves only the fp32 log-sum-exp per row. The backward kernel recomputes the softmax
from the saved lse: grad = (softmax(x) * (1 + 2 z lse) - onehot(label)) * logit_scale * grad_out.
Offsets are int64 (vocab x tokens overflows int32); every load is converted to fp32 at once (also what
the Triton CPU interpreter needs: its bf16 arithmetic is wrong); strides are passed for every tensor.
Under the interpreter only, bf16 gradient stores are rounded to nearest-even by hand (ROUND_BF16): the
interpreter's fp32 -> bf16 cast truncates, where a GPU's rounds.

The kernels are shared with fused_linear_cross_entropy (whose forward writes the logits' gradient in
place of the logits, ``ce_forward`` with ``grad_rows``) and vocab_parallel_cross_entropy (local row
statistics, ``row_stats``; the backward with a column offset), through the section "Internal API shared
by the fused and vocab-parallel losses" below: its names are the only ones those modules import.
Block sizes and num_warps come from megacpm.kernels.launch (``default_block_size`` is its rule capped at
MAX_BLOCK).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from megacpm.kernels.dispatch import tl, triton, use_triton
from megacpm.kernels.launch import launch_settings, num_warps_for, round_bf16


REDUCTIONS = ("mean", "sum", "none")
MAX_BLOCK = 4096  # vocab columns per loop iteration of a program


def default_block_size(n_cols: int) -> int:
    """Vocabulary columns per loop iteration: megacpm.kernels.launch's rule capped at MAX_BLOCK."""
    return launch_settings(n_cols, max_block=MAX_BLOCK)[0]


def _launch(n_cols: int, block_size: Optional[int]) -> Tuple[int, int]:
    """(BLOCK, num_warps) for rows of n_cols columns, ``block_size`` overriding the block."""
    block = block_size or default_block_size(n_cols)
    return block, num_warps_for(block)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
if triton is not None:
    from megacpm.kernels.casting import cast_rne

    @triton.jit
    def _online_lse(x_row, stride_xc, n_cols, scale, BLOCK: tl.constexpr):
        """(max, sum of exp(x - max)) of one row of x = logits * scale, one block at a time."""
        m = float("-inf")
        d = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=mask, other=0.0).to(tl.float32)
            x = tl.where(mask, x * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        return m, d

    @triton.jit
    def _target_logit(x_row, stride_xc, target, has_target, scale):
        safe = tl.where(has_target, target, 0).to(tl.int64)
        t = tl.load(x_row + safe * stride_xc, mask=has_target, other=0.0).to(tl.float32)
        return tl.where(has_target, t * scale, 0.0)

    @triton.jit
    def _write_grad_row_scaled(x_row, stride_xc, g_row, stride_gc, n_cols, target, lse, coef, row_factor,
                               scale, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
        """g = (exp(x * scale - lse) * coef - onehot(target)) * row_factor for raw logits x.

        g_row may alias x_row: each block is read before it is overwritten, by the same program."""
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x * scale - lse)
            grad = (p * coef - tl.where(cols == target, 1.0, 0.0)) * row_factor
            tl.store(g_row + cols.to(tl.int64) * stride_gc, cast_rne(grad, g_row.dtype.element_ty, ROUND_BF16), mask=mask)

    @triton.jit
    def _ce_fwd_kernel(x_ptr, stride_xr, stride_xc, labels_ptr, stride_l, loss_ptr, lse_ptr,
                       g_ptr, stride_gr, stride_gc, gscale_ptr, stride_gs,
                       n_cols, scale, ignore_index, z_loss,
                       BLOCK: tl.constexpr, HAS_Z: tl.constexpr, WRITE_GRAD: tl.constexpr,
                       ROUND_BF16: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xr
        label = tl.load(labels_ptr + row * stride_l).to(tl.int64)
        valid = label != ignore_index
        m, d = _online_lse(x_row, stride_xc, n_cols, scale, BLOCK)
        lse = m + tl.log(d)
        t = _target_logit(x_row, stride_xc, label, valid, scale)
        loss = lse - t
        if HAS_Z:
            loss += z_loss * lse * lse
        tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
        tl.store(lse_ptr + row, lse)
        if WRITE_GRAD:
            g = tl.load(gscale_ptr + row * stride_gs).to(tl.float32)
            row_factor = tl.where(valid, g * scale, 0.0)
            coef = 1.0
            if HAS_Z:
                coef += 2.0 * z_loss * lse
            _write_grad_row_scaled(x_row, stride_xc, g_ptr + row * stride_gr, stride_gc, n_cols, label,
                                   lse, coef, row_factor, scale, BLOCK, ROUND_BF16)

    @triton.jit
    def _ce_bwd_kernel(x_ptr, stride_xr, stride_xc, labels_ptr, stride_l, lse_ptr, stride_lse,
                       gout_ptr, stride_go, g_ptr, stride_gr, stride_gc,
                       n_cols, col_offset, scale, ignore_index, z_loss,
                       BLOCK: tl.constexpr, HAS_Z: tl.constexpr, ROUND_BF16: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(labels_ptr + row * stride_l).to(tl.int64)
        valid = label != ignore_index
        target = tl.where(valid, label - col_offset, -1)
        lse = tl.load(lse_ptr + row * stride_lse).to(tl.float32)
        g = tl.load(gout_ptr + row * stride_go).to(tl.float32)
        row_factor = tl.where(valid, g * scale, 0.0)
        coef = 1.0
        if HAS_Z:
            coef += 2.0 * z_loss * lse
        _write_grad_row_scaled(x_ptr + row * stride_xr, stride_xc, g_ptr + row * stride_gr, stride_gc,
                               n_cols, target, lse, coef, row_factor, scale, BLOCK, ROUND_BF16)

    @triton.jit
    def _row_stats_kernel(x_ptr, stride_xr, stride_xc, labels_ptr, stride_l, m_ptr, d_ptr, t_ptr,
                          n_cols, col_offset, scale, ignore_index, BLOCK: tl.constexpr):
        """Per row of a vocabulary shard: max and sum of exp(x - max) of x = logits * scale, and the
        target's x when the label falls in this shard's columns [col_offset, col_offset + n_cols)."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xr
        label = tl.load(labels_ptr + row * stride_l).to(tl.int64)
        target = label - col_offset
        has_target = (label != ignore_index) & (target >= 0) & (target < n_cols)
        m, d = _online_lse(x_row, stride_xc, n_cols, scale, BLOCK)
        tl.store(m_ptr + row, m)
        tl.store(d_ptr + row, d)
        tl.store(t_ptr + row, _target_logit(x_row, stride_xc, target, has_target, scale))


# ====================================================================================================
# Internal API shared by the fused and vocab-parallel losses
#
# Plain functions on 2-D logits [rows, cols] and 1-D labels [rows], no autograd. These are the only
# names of this module that megacpm.kernels.fused_linear_cross_entropy and
# megacpm.kernels.vocab_parallel_cross_entropy import (no module imports another's underscore names):
#
#   check_inputs(logits, labels)                   shapes, dtypes, devices (asserts)
#   check_labels(labels, n_cols, ignore_index)     out-of-range labels raise IndexError (CPU only)
#   ce_forward(logits, labels, ...)                Triton: per-row (loss, lse); optionally writes the
#                                                  logits' gradient (in place by default)
#   ce_backward(logits, labels, lse, grad_rows,..) Triton: the logits' gradient from the saved lse, with
#                                                  a column offset for a vocabulary shard
#   row_stats(logits, labels, ..., col_offset)     Triton: per-row (max, sum exp(x - max), target x) of
#                                                  a vocabulary shard
#   torch_cross_entropy_rows(...)                  PyTorch: per-row losses, differentiable by autograd
#   torch_ce_forward_and_grad_(...)                PyTorch twin of ce_forward with grad_rows
#   torch_row_stats(...) / torch_row_stats_(...)   PyTorch twin of row_stats (the second consumes the
#                                                  logits and also returns exp(x - max) in their place)
#   torch_shard_grad_(e, labels, m_local, lse,...) PyTorch: a shard's logits' gradient in place of that
#                                                  exp(x - max), given the global lse
#   reduce_rows(loss, labels, ignore_index, reduction)   mean over non-ignored rows (0 if none) / sum / none
#
# x = logits * scale throughout; every result is fp32.
# ====================================================================================================
def check_inputs(logits: torch.Tensor, labels: torch.Tensor) -> None:
    assert logits.ndim == 2, f"logits must be [rows, vocab], got {tuple(logits.shape)}"
    assert labels.ndim == 1 and labels.shape[0] == logits.shape[0], \
        f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}"
    assert logits.shape[1] >= 1, "empty vocabulary"
    assert logits.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {logits.dtype}"
    assert not labels.dtype.is_floating_point, f"labels must be integers, got {labels.dtype}"
    assert labels.device == logits.device


def check_labels(labels: torch.Tensor, n_cols: int, ignore_index: int) -> None:
    """Out-of-range labels would read out of bounds; checked where it costs no device sync."""
    if labels.is_cuda or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_cols))
    if bool(bad.any()):
        raise IndexError(f"label {int(labels[bad][0])} out of range for vocabulary {n_cols}")


def ce_forward(logits: torch.Tensor, labels: torch.Tensor, scale: float, ignore_index: int, z_loss: float,
               grad_rows: Optional[torch.Tensor] = None, grad_out: Optional[torch.Tensor] = None,
               block_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-row fp32 loss, per-row fp32 lse). With ``grad_rows`` (fp32, 0-d or [rows]: the factor
    d total / d loss_row), also writes d total / d logits into ``grad_out`` (default: the logits
    themselves, in place)."""
    check_inputs(logits, labels)
    rows, n_cols = logits.shape
    check_labels(labels, n_cols, ignore_index)
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss, lse
    block, num_warps = _launch(n_cols, block_size)
    write_grad = grad_rows is not None
    if write_grad:
        grad_out = logits if grad_out is None else grad_out
        assert grad_out.shape == logits.shape and grad_out.device == logits.device
        assert grad_rows.dtype == torch.float32 and grad_rows.ndim <= 1
        gs_stride = 0 if grad_rows.ndim == 0 or grad_rows.shape[0] == 1 else grad_rows.stride(0)
        if grad_rows.ndim == 1 and grad_rows.shape[0] != 1:
            assert grad_rows.shape[0] == rows
    else:
        grad_out, grad_rows, gs_stride = loss, loss, 0  # unused pointers
    _ce_fwd_kernel[(rows,)](
        logits, logits.stride(0), logits.stride(1), labels, labels.stride(0), loss, lse,
        grad_out, grad_out.stride(0) if write_grad else 0, grad_out.stride(1) if write_grad else 0,
        grad_rows, gs_stride, n_cols, float(scale), int(ignore_index), float(z_loss),
        BLOCK=block, HAS_Z=z_loss != 0.0, WRITE_GRAD=write_grad, ROUND_BF16=round_bf16(),
        num_warps=num_warps)
    return loss, lse


def ce_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor,
                scale: float, ignore_index: int, z_loss: float = 0.0, col_offset: int = 0,
                grad_out: Optional[torch.Tensor] = None, block_size: Optional[int] = None) -> torch.Tensor:
    """d total / d logits = (softmax(x) (1 + 2 z lse) - onehot(label - col_offset)) * scale * grad_rows.

    ``grad_out`` may be ``logits`` itself (each block is read before it is overwritten)."""
    check_inputs(logits, labels)
    rows, n_cols = logits.shape
    if grad_out is None:
        grad_out = torch.empty_like(logits)
    assert grad_out.shape == logits.shape
    if rows == 0:
        return grad_out
    assert lse.dtype == torch.float32 and lse.shape == (rows,)
    grad_rows = grad_rows.float() if grad_rows.dtype != torch.float32 else grad_rows
    assert grad_rows.ndim <= 1
    go_stride = 0 if grad_rows.ndim == 0 or grad_rows.shape[0] == 1 else grad_rows.stride(0)
    if go_stride:
        assert grad_rows.shape[0] == rows
    block, num_warps = _launch(n_cols, block_size)
    _ce_bwd_kernel[(rows,)](
        logits, logits.stride(0), logits.stride(1), labels, labels.stride(0), lse, lse.stride(0),
        grad_rows, go_stride, grad_out, grad_out.stride(0), grad_out.stride(1),
        n_cols, int(col_offset), float(scale), int(ignore_index), float(z_loss),
        BLOCK=block, HAS_Z=z_loss != 0.0, ROUND_BF16=round_bf16(), num_warps=num_warps)
    return grad_out


def row_stats(logits: torch.Tensor, labels: torch.Tensor, scale: float, ignore_index: int, col_offset: int,
              block_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, sum exp(x - max), target x or 0) per row of a vocabulary shard, fp32 (Triton)."""
    check_inputs(logits, labels)
    rows, n_cols = logits.shape
    m, d, t = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    if rows == 0:
        return m, d, t
    block, num_warps = _launch(n_cols, block_size)
    _row_stats_kernel[(rows,)](
        logits, logits.stride(0), logits.stride(1), labels, labels.stride(0), m, d, t,
        n_cols, int(col_offset), float(scale), int(ignore_index), BLOCK=block, num_warps=num_warps)
    return m, d, t


def torch_cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, scale: float, ignore_index: int,
                             z_loss: float = 0.0) -> torch.Tensor:
    """Per-row fp32 losses (0 where ignored), differentiable by autograd."""
    x = logits.float() * scale
    labels = labels.long()
    lse = torch.logsumexp(x, dim=-1)
    valid = labels != ignore_index
    target = x.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    loss = lse - target
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss))


def torch_ce_forward_and_grad_(logits: torch.Tensor, labels: torch.Tensor, scale: float, ignore_index: int,
                               z_loss: float, grad_rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The torch twin of ``ce_forward(..., grad_rows)``: (per-row fp32 loss, the logits' gradient in an
    fp32 buffer that reuses ``logits`` when it is fp32). One [rows, vocab] fp32 buffer and nothing else
    of that size: the softmax is taken in place as exp(x - max) / sum (logsumexp would allocate a
    [rows, vocab] temporary, which on a CPU costs more than its arithmetic: fresh pages)."""
    labels = labels.long()
    x = logits.float() if logits.dtype != torch.float32 else logits
    x.mul_(scale)  # in place when the logits are fp32: the caller's buffer becomes the gradient
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    target = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    row_max = x.amax(dim=-1)
    e = x.sub_(row_max.unsqueeze(-1)).exp_()
    denominator = e.sum(dim=-1)
    lse = row_max + denominator.log()
    loss = lse - target
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    factor = torch.where(valid, grad_rows.float().expand(labels.shape[0]) * scale, torch.zeros_like(lse))
    coef = factor * (1.0 + 2.0 * z_loss * lse) if z_loss else factor
    grad = e.mul_((coef / denominator).unsqueeze(-1))
    grad.scatter_add_(-1, safe.unsqueeze(-1), -factor.unsqueeze(-1))
    return loss, grad


def torch_row_stats_(logits: torch.Tensor, labels: torch.Tensor, scale: float, ignore_index: int,
                     col_offset: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch twin of ``row_stats`` that consumes ``logits``: (max m, sum exp(x - m), target x or 0,
    e = exp(x - m) [rows, cols] fp32). e reuses the logits' buffer when they are fp32 (else one fp32
    copy): no other [rows, cols] buffer is made."""
    labels = labels.long()
    x = logits.float() if logits.dtype != torch.float32 else logits
    x.mul_(scale)
    m = x.amax(dim=-1)
    target = labels - col_offset
    has = (labels != ignore_index) & (target >= 0) & (target < x.shape[-1])
    t = x.gather(-1, torch.where(has, target, 0).unsqueeze(-1)).squeeze(-1)
    t = torch.where(has, t, torch.zeros_like(t))
    e = x.sub_(m.unsqueeze(-1)).exp_()
    return m, e.sum(dim=-1), t, e


def torch_row_stats(logits: torch.Tensor, labels: torch.Tensor, scale: float, ignore_index: int,
                    col_offset: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch twin of ``row_stats``: (max, sum exp(x - max), target x or 0); ``logits`` is kept."""
    m, d, t, _ = torch_row_stats_(logits.to(torch.float32, copy=True), labels, scale, ignore_index, col_offset)
    return m, d, t


def torch_shard_grad_(e: torch.Tensor, labels: torch.Tensor, m_local: torch.Tensor, lse: torch.Tensor,
                      grad_rows: torch.Tensor, scale: float, ignore_index: int, col_offset: int) -> torch.Tensor:
    """The logits' gradient of a vocabulary shard from ``torch_row_stats_``'s e = exp(x - m_local), in place
    of e: (exp(x - lse) - onehot(label - col_offset)) * scale * grad_rows, with the global lse, as
    exp(x - m_local) * exp(m_local - lse). Returns e."""
    labels = labels.long()
    valid = labels != ignore_index
    factor = torch.where(valid, grad_rows.float().expand(labels.shape[0]) * scale, torch.zeros_like(lse))
    e.mul_((torch.exp(m_local - lse) * factor).unsqueeze(-1))
    target = labels - col_offset
    has = valid & (target >= 0) & (target < e.shape[-1])
    e.scatter_add_(-1, torch.where(has, target, 0).unsqueeze(-1),
                   torch.where(has, -factor, torch.zeros_like(factor)).unsqueeze(-1))
    return e


def reduce_rows(loss: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """mean over non-ignored rows (0 when there are none), sum, or the rows themselves."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    count = (labels != ignore_index).sum().clamp(min=1)
    return total / count.to(torch.float32)


# ----------------------------------------------------------------------------------------------------
# Autograd and the functional API
# ----------------------------------------------------------------------------------------------------
class CrossEntropyFunction(torch.autograd.Function):
    """Per-row fp32 losses of 2-D logits by the Triton kernels; the reduction is done outside."""

    @staticmethod
    def forward(ctx, logits, labels, scale, ignore_index, z_loss, block_size):
        loss, lse = ce_forward(logits, labels, scale, ignore_index, z_loss, block_size=block_size)
        ctx.save_for_backward(logits, labels, lse)
        ctx.args = (scale, ignore_index, z_loss, block_size)
        ctx.mark_non_differentiable(lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, lse = ctx.saved_tensors
        scale, ignore_index, z_loss, block_size = ctx.args
        grad = ce_backward(logits, labels, lse, grad_loss, scale, ignore_index, z_loss, block_size=block_size)
        return grad, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, logit_scale: float = 1.0, ignore_index: int = -100,
                  reduction: str = "mean", z_loss: float = 0.0, impl: str = "auto",
                  block_size: Optional[int] = None) -> torch.Tensor:
    """Cross entropy of softmax(logits * logit_scale) in fp32 (see the module docstring).

    logits [..., vocab], labels [...]; returns an fp32 scalar ("mean", "sum") or fp32 [...] ("none").
    ``block_size`` (Triton only) overrides the vocabulary columns per loop iteration (a power of two).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    assert labels.shape == logits.shape[:-1], f"labels {tuple(labels.shape)} vs logits {tuple(logits.shape)}"
    lead = labels.shape
    logits2d = logits.reshape(-1, logits.shape[-1])
    labels1d = labels.reshape(-1)
    if use_triton(impl, logits, labels):
        loss = CrossEntropyFunction.apply(logits2d, labels1d, float(logit_scale), int(ignore_index),
                                          float(z_loss), block_size)
    else:
        loss = torch_cross_entropy_rows(logits2d, labels1d, float(logit_scale), int(ignore_index), float(z_loss))
    out = reduce_rows(loss, labels1d, ignore_index, reduction)
    return out.reshape(lead) if reduction == "none" else out
