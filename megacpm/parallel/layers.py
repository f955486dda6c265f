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

from megacpm.parallel.param_spec import ParamSpec, param_spec, set_param_spec
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


def shard(full: torch.Tensor, dim: int, group: Group, pad: bool = False) -> torch.Tensor:
    """This rank's contiguous slice of ``full`` along ``dim``.

    The group size must divide that dimension, unless ``pad``: then every rank gets ceil(n / size)
    rows, the last ones completed with zeros (torch.chunk's split, so a checkpoint can describe the
    real rows as an uneven shard).
    """
    size = group_size(group)
    if full.shape[dim] % size:
        if not pad:
            raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not divide over {size} ranks")
        extra = list(full.shape)
        extra[dim] = padded_size(full.shape[dim], size) - full.shape[dim]
        full = torch.cat([full, full.new_zeros(extra)], dim=dim)
    return full.chunk(size, dim=dim)[_rank(group)].clone()


def padded_size(rows: int, size: int) -> int:
    """``rows`` rounded up to a multiple of ``size`` (Megatron pads the vocabulary the same way)."""
    return -(-rows // size) * size


def _tp_spec(weight: nn.Parameter, dim: int, global_rows: int, group: Group) -> None:
    """Declare the split of a TP layer's weight: along ``dim``, and, when the rows of dim 0 are
    padded (a vocabulary the group size does not divide), which leading rows are real."""
    padded = None
    if dim == 0 and global_rows % group_size(group):
        per_rank = weight.shape[0]
        padded = (global_rows, max(0, min(per_rank, global_rows - _rank(group) * per_rank)))
    set_param_spec(weight, ParamSpec(shard_dims={"tp": dim}, padded_rows=padded))


class _FromFull(nn.Module):
    """``from_full``: build the layer for a full weight and keep this rank's shard of it, cut along
    the dimension its ParamSpec declares."""

    FULL_SHAPE_IS_OUT_IN = True  # linear weights are [out, in]; constructors take (in, out)

    @classmethod
    def from_full(cls, full_weight: torch.Tensor, group: Group, **kwargs):
        rows, cols = full_weight.shape
        dims = (cols, rows) if cls.FULL_SHAPE_IS_OUT_IN else (rows, cols)
        layer = cls(*dims, group, dtype=full_weight.dtype, **kwargs)
        spec = param_spec(layer.weight)
        with torch.no_grad():
            layer.weight.copy_(shard(full_weight, spec.shard_dim("tp"), group, pad=spec.padded_rows is not None))
        return layer


class ColumnParallelLinear(_FromFull):
    """y = x @ W.T with W's output features split over the group: each rank computes its slice."""

    def __init__(self, in_features: int, out_features: int, group: Group, gather_output: bool = False,
                 sequence_parallel: bool = False, input_ready: bool = False, pad_outputs: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        size = group_size(group)
        if out_features % size and not pad_outputs:
            raise ValueError(f"output features {out_features} do not divide over {size} tensor-parallel ranks")
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        # input_ready: the input already went through copy_to_tp / gather_from_sp once, in the norm
        # that feeds several column layers (q, k, v; gate, up), so one collective serves them all.
        self.input_ready = input_ready
        self.weight = nn.Parameter(torch.empty(padded_size(out_features, size) // size, in_features, dtype=dtype))
        _tp_spec(self.weight, 0, out_features, group)  # padded: an LM head over a vocabulary tp does not divide

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
        _tp_spec(self.weight, 1, out_features, group)

    def forward(self, x_shard: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x_shard, self.weight)
        return reduce_scatter_sp(partial, self.group) if self.sequence_parallel else reduce_from_tp(partial, self.group)


class VocabParallelEmbedding(_FromFull):
    """Each rank owns a contiguous vocabulary range of ceil(vocab / tp) rows (the last rank's tail is
    zero padding when tp does not divide the vocabulary: MiniCPM-2.4B's 122753 is prime); ids outside
    a rank's range embed to zero before the sum."""

    FULL_SHAPE_IS_OUT_IN = False  # the full weight is [vocab, dim], the constructor order

    def __init__(self, vocab_size: int, dim: int, group: Group, sequence_parallel: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        size = group_size(group)
        per_rank = padded_size(vocab_size, size) // size
        self.group, self.sequence_parallel = group, sequence_parallel
        self.vocab_start = _rank(group) * per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, dim, dtype=dtype))
        _tp_spec(self.weight, 0, vocab_size, group)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight)
        embedded = embedded.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_sp(embedded, self.group) if self.sequence_parallel else reduce_from_tp(embedded, self.group)
