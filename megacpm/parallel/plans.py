"""Tensor-parallel sharding plans: one per module type, applied to a model built in full.

``apply_tensor_parallel(model, group, sequence_parallel)`` walks the model and applies the plan of
each module's type (TP_PLANS): a plan swaps the module's dense children for their column/row/vocab
parallel versions holding this rank's shard, declares every parameter it leaves with a ParamSpec,
and injects what the module needs (the per-rank dropout stream, the vocab-parallel loss head).
A new module type adds its plan here; a dense layer or an undeclared parameter that
no plan covered is an error under tp > 1, never a silently replicated full-size weight.

Communication per decoder layer (forward), Megatron's count: without SP one all-reduce after the
attention output projection and one after the MLP down projection; with SP an all-gather before each
of the two column-parallel groups and a reduce-scatter after each row-parallel layer.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megacpm import kernels
from megacpm.model.minicpm import MLP, Attention, DecoderLayer, MiniCPM, RMSNorm
from megacpm.model.moe import MoEMLP
from megacpm.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, shard
from megacpm.parallel.mappings import (Group, copy_to_tp, gather_from_sp, group_size, reduce_from_tp,
                                       reduce_scatter_sp)
from megacpm.parallel.param_spec import ParamSpec, has_param_spec, param_spec, set_param_spec
from megacpm.parallel.random import tensor_parallel_rng


class ShardingError(ValueError):
    """A model that the tensor-parallel plans do not fully cover."""


@dataclass(frozen=True)
class TensorParallel:
    """What a plan needs: the TP group, this rank in it, and whether sequence parallelism is on."""

    group: Group
    sequence_parallel: bool

    @property
    def size(self) -> int:
        return group_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.size > 1 else 0


class ParallelInputNorm(RMSNorm):
    """An RMSNorm whose output feeds column-parallel layers: all-gathered over the sequence (SP) or
    entered into the TP region once (so q, k and v share one backward all-reduce)."""

    def __init__(self, norm: RMSNorm, tp: TensorParallel):
        super().__init__(norm.weight.shape[0], norm.eps)
        with torch.no_grad():
            self.weight.copy_(norm.weight)
        self.group, self.sequence_parallel = tp.group, tp.sequence_parallel
        # Under SP each rank sees only its sequence shard: the gain's gradient is partial.
        set_param_spec(self.weight, ParamSpec(partial_over=("tp",) if tp.sequence_parallel else ()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return gather_from_sp(y, self.group) if self.sequence_parallel else copy_to_tp(y, self.group)


class ReplicatedKVProjection(nn.Module):
    """k or v projection when tp does not divide the kv heads: the full weight on every rank, of
    whose output this rank keeps the kv heads its query heads use. Its gradient is partial per
    rank (completed over TP before clipping)."""

    def __init__(self, full_weight: torch.Tensor, head_dim: int, first_head: int, num_heads: int):
        super().__init__()
        self.weight = nn.Parameter(full_weight.clone())
        set_param_spec(self.weight, ParamSpec(partial_over=("tp",)))
        self.lo, self.hi = first_head * head_dim, (first_head + num_heads) * head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[self.lo:self.hi])


class PartialGradientLinear(nn.Module):
    """A linear layer whole on every TP rank whose weight's gradient is partial per rank, completed
    over TP before clipping: the MoE router, whose routing weights multiply partial expert outputs."""

    def __init__(self, full_weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(full_weight.clone())
        set_param_spec(self.weight, ParamSpec(partial_over=("tp",)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class VocabParallelOutputLoss:
    """The LM head's loss (summed, or per token) when the output weight's rows (the vocabulary) are split over the
    TP group: logits a chunk of tokens at a time, padding rows of a vocabulary tp does not divide
    given probability zero (megacpm.kernels.fused_linear_vocab_parallel_cross_entropy). The hidden
    states entered the TP region in the final norm, whose backward sums the ranks' partial input
    gradients."""

    def __init__(self, tp: TensorParallel):
        self.group, self.rank = tp.group, tp.rank

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, logit_scale: float,
                 ignore_index: int, chunk_tokens: Optional[int], reduction: str = "sum") -> torch.Tensor:
        spec = param_spec(weight)
        valid = spec.padded_rows[1] if spec.padded_rows is not None else weight.shape[0]
        return kernels.fused_linear_vocab_parallel_cross_entropy(
            hidden, weight, labels, self.group, logit_scale=logit_scale, ignore_index=ignore_index,
            reduction=reduction, vocab_start=self.rank * weight.shape[0], valid_rows=valid,
            chunk_tokens=chunk_tokens)


# -- the plans -------------------------------------------------------------------------------------
def _column(linear: nn.Linear, tp: TensorParallel, **kwargs) -> ColumnParallelLinear:
    return ColumnParallelLinear.from_full(linear.weight.data, tp.group, input_ready=True, **kwargs)


def _row(linear: nn.Linear, tp: TensorParallel) -> RowParallelLinear:
    return RowParallelLinear.from_full(linear.weight.data, tp.group, sequence_parallel=tp.sequence_parallel)


def plan_attention(attn: Attention, tp: TensorParallel) -> None:
    """q (and k, v when tp divides the kv heads) column-parallel by heads, o row-parallel; kv heads
    tp does not divide stay whole on every rank (ReplicatedKVProjection). Dropout on this rank's own
    heads draws from this rank's own stream."""
    attn.dropout_rng = functools.partial(tensor_parallel_rng, tp.rank)
    n_heads, n_kv = attn.n_heads, attn.n_kv_heads
    attn.q_proj = _column(attn.q_proj, tp)
    if n_kv % tp.size == 0:
        attn.k_proj, attn.v_proj = _column(attn.k_proj, tp), _column(attn.v_proj, tp)
    else:
        q_per_rank = n_heads // tp.size
        group_of_q = n_heads // n_kv
        first_kv = tp.rank * q_per_rank // group_of_q
        num_kv = max(1, q_per_rank // group_of_q)
        attn.k_proj = ReplicatedKVProjection(attn.k_proj.weight.data, attn.head_dim, first_kv, num_kv)
        attn.v_proj = ReplicatedKVProjection(attn.v_proj.weight.data, attn.head_dim, first_kv, num_kv)
    attn.o_proj = _row(attn.o_proj, tp)


def plan_mlp(mlp: MLP, tp: TensorParallel) -> None:
    """SwiGLU: gate and up column-parallel, down row-parallel."""
    mlp.gate_proj, mlp.up_proj = _column(mlp.gate_proj, tp), _column(mlp.up_proj, tp)
    mlp.down_proj = _row(mlp.down_proj, tp)


def plan_moe(moe: MoEMLP, tp: TensorParallel) -> None:
    """Every expert split like the dense MLP (w1, w3 [E, I, H] by I; w2 [E, H, I] by I), the router
    whole on every rank: each rank routes the same tokens (its input entered the TP region in the
    norm) to the same experts, computes its part of their outputs, and the parts are summed (SP:
    reduce-scattered over the sequence) as after a row-parallel layer. The router's gradient is
    partial (the routing weights meet partial outputs); its auxiliary-loss part is computed on every
    rank and shared 1/tp each (megacpm.model.moe_step.MoEStep's grad_share)."""
    moe.gate = PartialGradientLinear(moe.gate.weight.data)
    for name, dim in (("w1", 1), ("w3", 1), ("w2", 2)):
        full = getattr(moe, name).data
        setattr(moe, name, nn.Parameter(shard(full, dim, tp.group)))
        set_param_spec(getattr(moe, name), ParamSpec(shard_dims={"tp": dim}))
    reduce = reduce_scatter_sp if tp.sequence_parallel else reduce_from_tp
    moe.complete_output = functools.partial(reduce, group=tp.group)


def plan_decoder_layer(layer: DecoderLayer, tp: TensorParallel) -> None:
    """Both norms feed column-parallel layers: they enter the TP region (or gather the sequence)."""
    layer.input_layernorm = ParallelInputNorm(layer.input_layernorm, tp)
    layer.post_attention_layernorm = ParallelInputNorm(layer.post_attention_layernorm, tp)


def plan_model(model: MiniCPM, tp: TensorParallel) -> None:
    """Vocab-parallel embedding and LM head (padded when tp does not divide the vocabulary), the
    final norm entering the TP region, the vocab-parallel loss; under SP the hidden states between
    layers hold 1/tp of each sequence."""
    model.embed_tokens = VocabParallelEmbedding.from_full(model.embed_tokens.weight.data, tp.group,
                                                         sequence_parallel=tp.sequence_parallel)
    model.norm = ParallelInputNorm(model.norm, tp)
    if model.lm_head is not None:
        model.lm_head = _column(model.lm_head, tp, pad_outputs=True)
    model.output_loss = VocabParallelOutputLoss(tp)
    model.sequence_shards = tp.size if tp.sequence_parallel else 1


TP_PLANS: Dict[type, Callable[[nn.Module, TensorParallel], None]] = {
    MiniCPM: plan_model,
    DecoderLayer: plan_decoder_layer,
    Attention: plan_attention,
    MLP: plan_mlp,
    MoEMLP: plan_moe,
}
DENSE_TYPES = (nn.Linear, nn.Embedding)  # what a plan must have replaced


def apply_tensor_parallel(model: nn.Module, group: Group, sequence_parallel: bool = False) -> None:
    """Shard ``model`` in place by the plans of its module types (see the module docstring)."""
    tp = TensorParallel(group, sequence_parallel)
    if tp.size == 1 and not sequence_parallel:
        return
    for _, module in list(model.named_modules()):  # a snapshot: plans replace children
        plan = TP_PLANS.get(type(module))
        if plan is not None:
            plan(module, tp)
    for name, module in model.named_modules():
        if type(module) in DENSE_TYPES:
            raise ShardingError(f"{name}: a {type(module).__name__} that no tensor-parallel plan covers "
                                f"(add a plan for its parent's type to megacpm.parallel.plans.TP_PLANS)")
    for name, param in model.named_parameters():
        if not has_param_spec(param):
            raise ShardingError(f"{name}: a parameter of shape {tuple(param.shape)} that no tensor-parallel "
                                f"plan declared (its module type needs a plan in megacpm.parallel.plans)")
