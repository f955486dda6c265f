"""Tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding.

Each layer holds one rank's shard of the full weight and is built from the full weight (``from_full``),
so a model initialised once in full (the same generator, the same order) and then sharded is the
same model as in one process: the basis of the loss-parity tests.

Sequence parallelism (``sequence_parallel=True``): activations outside these layers are sharded on
the sequence dimension; a column layer all-gathers its input and a row layer reduce-scatters its
output instead of all-reducing it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megacpm.parallel.mappings import (
    Group,
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    group_size,
    reduce_from_tp,
    reduce_scatter_sp,
)


def _rank(group: Group) -> int:
    import torch.distributed as dist

    return 0 if group_size(group) == 1 else dist.get_rank(group)


def shard(full: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's contiguous slice of ``full`` along ``dim`` (which the group size must divide)."""
    size = group_size(group)
    if full.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not divide over {size} ranks")
    return full.chunk(size, dim=dim)[_rank(group)].clone()


class _FromFull(nn.Module):
    """``from_full``: build the layer for a full weight and keep this rank's shard of it, cut along
    the dimension the layer records on its weight (``tp_shard_dim``)."""

    FULL_SHAPE_IS_OUT_IN = True  # linear weights are [out, in]; constructors take (in, out)

    @classmethod
    def from_full(cls, full_weight: torch.Tensor, group: Group, **kwargs):
        rows, cols = full_weight.shape
        dims = (cols, rows) if cls.FULL_SHAPE_IS_OUT_IN else (rows, cols)
        layer = cls(*dims, group, dtype=full_weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(shard(full_weight, layer.weight.tp_shard_dim, group))
        return layer


class ColumnParallelLinear(_FromFull):
    """y = x @ W.T with W's output features split over the group: each rank computes its slice."""

    def __init__(self, in_features: int, out_features: int, group: Group, gather_output: bool = False,
                 sequence_parallel: bool = False, input_ready: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        size = group_size(group)
        if out_features % size:
            raise ValueError(f"output features {out_features} do not divide over {size} tensor-parallel ranks")
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        # input_ready: the input already went through copy_to_tp / gather_from_sp once, in the norm
        # that feeds several column layers (q, k, v; gate, up), so one collective serves them all.
        self.input_ready = input_ready
        self.weight = nn.Parameter(torch.empty(out_features // size, in_features, dtype=dtype))
        self.weight.tp_shard_dim = 0


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_ready:
            x = gather_from_sp(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        y = F.linear(x, self.weight)
        return gather_from_tp(y, self.group) if self.gather_output else y


class RowParallelLinear(_FromFull):
    """y = x @ W.T with W's input features split: partial products summed over the group."""

    def __init__(self, in_features: int, out_features: int, group: Group, sequence_parallel: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        size = group_size(group)
        if in_features % size:
            raise ValueError(f"input features {in_features} do not divide over {size} tensor-parallel ranks")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_features // size, dtype=dtype))
        self.weight.tp_shard_dim = 1


    def forward(self, x_shard: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x_shard, self.weight)
        return reduce_scatter_sp(partial, self.group) if self.sequence_parallel else reduce_from_tp(partial, self.group)


class VocabParallelEmbedding(_FromFull):
    FULL_SHAPE_IS_OUT_IN = False  # the full weight is [vocab, dim], the constructor order
    """Each rank owns a contiguous vocabulary range; ids outside it embed to zero before the sum."""

    def __init__(self, vocab_size: int, dim: int, group: Group, sequence_parallel: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        size = group_size(group)
        if vocab_size % size:
            raise ValueError(f"vocab size {vocab_size} does not divide over {size} tensor-parallel ranks "
                             f"(pad the vocabulary)")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.vocab_start = _rank(group) * (vocab_size // size)
        self.weight = nn.Parameter(torch.empty(vocab_size // size, dim, dtype=dtype))
        self.weight.tp_shard_dim = 0


    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight)
        embedded = embedded.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_sp(embedded, self.group) if self.sequence_parallel else reduce_from_tp(embedded, self.group)
