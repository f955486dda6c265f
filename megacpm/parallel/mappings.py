"""The conjugate autograd functions that carry all tensor-parallel traffic (Megatron's mappings).

Each forward collective is paired with its adjoint in the backward:

  copy_to_tp        forward identity           backward all-reduce     (input of a column-parallel layer)
  reduce_from_tp    forward all-reduce         backward identity       (output of a row-parallel layer)
  scatter_to_tp     forward split (last dim)   backward all-gather
  gather_from_tp    forward all-gather (last)  backward split
  scatter_to_sp     forward split (seq dim)    backward all-gather     (entering sequence parallelism)
  gather_from_sp    forward all-gather (seq)   backward reduce-scatter (input of a column layer under SP)
  reduce_scatter_sp forward reduce-scatter     backward all-gather     (output of a row layer under SP)
  reduce_from_cp    forward all-reduce         backward identity       (a per-sequence sum from the cp ranks' parts)

A ``group`` of None or of size 1 makes every function the identity, so single-process code runs the
same path. The sequence dimension is dim 1 ([batch, seq, hidden]).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]
SEQ_DIM = 1


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {size} ranks")
    return x.chunk(size, dim=dim)[dist.get_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {size} ranks")
    if dist.get_backend(group) == "gloo":
        # gloo has no reduce_scatter: all-reduce, then keep this rank's part.
        return _split(_all_reduce(x, group), dim, group)
    inputs = [part.contiguous() for part in x.chunk(size, dim=dim)]
    out = torch.empty_like(inputs[0])
    dist.reduce_scatter(out, inputs, group=group)
    return out


def _identity(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x


class _Conjugate(torch.autograd.Function):
    """forward(x) = forward_fn(x, group); backward(grad) = backward_fn(grad, group)."""

    @staticmethod
    def forward(ctx, x, group, forward_fn, backward_fn):
        ctx.group, ctx.backward_fn = group, backward_fn
        return forward_fn(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad, ctx.group), None, None, None


def _mapping(forward_fn, backward_fn):
    def apply(x: torch.Tensor, group: Group) -> torch.Tensor:
        return x if group_size(group) == 1 else _Conjugate.apply(x, group, forward_fn, backward_fn)

    return apply


def _last(fn):
    return lambda x, group: fn(x, -1, group)


def _seq(fn):
    return lambda x, group: fn(x, SEQ_DIM, group)


copy_to_tp = _mapping(_identity, _all_reduce)
reduce_from_tp = _mapping(_all_reduce, _identity)
scatter_to_tp = _mapping(_last(_split), _last(_all_gather))
gather_from_tp = _mapping(_last(_all_gather), _last(_split))
scatter_to_sp = _mapping(_seq(_split), _seq(_all_gather))
gather_from_sp = _mapping(_seq(_all_gather), _seq(_reduce_scatter))
reduce_scatter_sp = _mapping(_seq(_reduce_scatter), _seq(_all_gather))
# A sum over a sequence's tokens completed from the context-parallel ranks' parts (an MoE layer's
# expert counts, a DPO row's log-probability); every cp rank goes on with the same whole, so the
# adjoint gives each rank's part the whole's gradient.
reduce_from_cp = _mapping(_all_reduce, _identity)
