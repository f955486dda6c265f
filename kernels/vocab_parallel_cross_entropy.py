"""Cross entropy over a vocabulary split across the ranks of a process group (Megatron's tensor parallel).

    loss = vocab_parallel_cross_entropy(logits_shard, labels, group, logit_scale=1.0, ignore_index=-100,
                                        reduction="mean", impl="auto")

Rank r of ``group`` holds the columns [r * V/p, (r + 1) * V/p) of the logits (equal, contiguous slices);
every rank holds all the labels (global vocabulary ids). The result is, on every rank, the
megacpm.kernels.cross_entropy of the concatenated logits (fp32, ignore_index, mean over non-ignored
tokens and 0 when there are none); the gradient is each rank's slice of the full gradient.

Forward: per row, the local max m_r, s_r = sum exp(x - m_r) and the target's x (0 when the label is in
another slice), by a Triton kernel (CUDA or the interpreter) or PyTorch; then exactly two collectives:
  1. all_reduce(MAX) of [m_r (rows), V/p, -V/p]: the global max m, plus a free check that the slices are
     equal (max and min of the slice sizes);
  2. all_reduce(SUM) of the stacked [s_r * exp(m_r - m), target x] (2 x rows).
lse = m + log(sum), loss = lse - target. Only the fp32 lse per row is saved. The backward needs no
communication: grad = (exp(x - lse) - onehot_local) * logit_scale * grad_out on the local slice.
Works over gloo and NCCL (only all_reduce with MAX and SUM).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megacpm.kernels.cross_entropy import (REDUCTIONS, ce_backward, check_inputs, reduce_rows, row_stats,
                                          torch_row_stats)
from megacpm.kernels.dispatch import use_triton


def _torch_backward(logits, labels, lse, grad_rows, scale, ignore_index, col_offset):
    labels = labels.long()
    x = logits.float() * scale
    grad = torch.exp(x - lse.unsqueeze(-1))
    valid = labels != ignore_index
    factor = torch.where(valid, grad_rows.float().expand(labels.shape[0]) * scale, torch.zeros_like(lse))
    grad.mul_(factor.unsqueeze(-1))
    target = labels - col_offset
    has = valid & (target >= 0) & (target < x.shape[-1])
    grad.scatter_add_(-1, torch.where(has, target, 0).unsqueeze(-1),
                      torch.where(has, -factor, torch.zeros_like(factor)).unsqueeze(-1))
    return grad.to(logits.dtype)


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Per-row fp32 losses; the reduction is done outside (it needs no communication)."""

    @staticmethod
    def forward(ctx, logits, labels, group, scale, ignore_index, triton_path):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        rows, local_vocab = logits.shape
        col_offset = rank * local_vocab
        if triton_path:
            m_local, d_local, t_local = row_stats(logits, labels, scale, ignore_index, col_offset)
        else:
            m_local, d_local, t_local = torch_row_stats(logits, labels, scale, ignore_index, col_offset)
        # Collective 1: global max per row, and the slice sizes' max and min.
        maxes = torch.cat([m_local, m_local.new_tensor([float(local_vocab), -float(local_vocab)])])
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        m = maxes[:rows]
        sizes = maxes[rows:].tolist() if not maxes.is_cuda else None
        if sizes is not None and sizes[0] != -sizes[1]:
            raise ValueError(f"vocab_parallel_cross_entropy needs equal vocabulary slices; got sizes between "
                             f"{-sizes[1]:.0f} and {sizes[0]:.0f}")
        # Collective 2: rescaled sums of exponentials and the target logit (held by one rank).
        sums = torch.stack([d_local * torch.exp(m_local - m), t_local])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        lse = m + torch.log(sums[0])
        valid = labels != ignore_index
        loss = torch.where(valid, lse - sums[1], torch.zeros_like(lse))
        if not labels.is_cuda and labels.numel():  # checked where it costs no device sync
            bad = valid & ((labels < 0) | (labels >= local_vocab * world))
            if bool(bad.any()):
                raise IndexError(f"label {int(labels[bad][0])} out of range for vocabulary {local_vocab * world}")
        ctx.save_for_backward(logits, labels, lse)
        ctx.args = (scale, ignore_index, col_offset, triton_path)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, lse = ctx.saved_tensors
        scale, ignore_index, col_offset, triton_path = ctx.args
        if triton_path:
            grad = ce_backward(logits, labels, lse, grad_loss, scale, ignore_index, 0.0, col_offset)
        else:
            grad = _torch_backward(logits, labels, lse, grad_loss, scale, ignore_index, col_offset)
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, labels: torch.Tensor,
                                 group: Optional[dist.ProcessGroup] = None, logit_scale: float = 1.0,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 impl: str = "auto") -> torch.Tensor:
    """Cross entropy of the logits split by vocabulary over ``group`` (see the module docstring).

    logits_shard [..., V/p], labels [...] (global ids, the same on every rank); ``group`` None is the
    default group. Returns an fp32 scalar ("mean", "sum") or fp32 [...] ("none"), the same on every rank.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    assert labels.shape == logits_shard.shape[:-1], \
        f"labels {tuple(labels.shape)} vs logits_shard {tuple(logits_shard.shape)}"
    lead = labels.shape
    logits2d = logits_shard.reshape(-1, logits_shard.shape[-1])
    labels1d = labels.reshape(-1)
    check_inputs(logits2d, labels1d)
    triton_path = use_triton(impl, logits_shard, labels)
    loss = VocabParallelCrossEntropyFunction.apply(logits2d, labels1d, group, float(logit_scale),
                                                   int(ignore_index), triton_path)
    out = reduce_rows(loss, labels1d, ignore_index, reduction)
    return out.reshape(lead) if reduction == "none" else out
