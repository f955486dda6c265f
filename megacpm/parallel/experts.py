"""Expert parallelism: each MoE layer's experts split over the ``ep`` ranks of an EP group (ep
consecutive data-parallel ranks), tokens sent to the rank holding their expert and back.

A rank routes its own tokens (routing, capacity and the auxiliary losses are those of one process:
megacpm.model.moe), sorts its assignments by expert, and then, per MoE layer:

1. exchanges the per-expert counts with its EP group (all-to-all of E integers): what it will send
   to and receive from each peer;
2. dispatches each assignment's hidden state to the rank owning the expert (all-to-all with uneven
   splits; a host read of the counts, as Megatron's dispatcher does);
3. regroups the received rows by local expert and runs its E / ep experts as one grouped GEMM
   (megacpm.model.moe.grouped_swiglu);
4. returns the outputs to their tokens' ranks (the inverse all-to-all), where the combine happens.

The autograd of a dispatch is the inverse dispatch. With tensor parallelism each TP rank of a
group exchanges with the EP peers of its own TP rank: they route the same tokens, their experts
hold the same slice of the intermediate dimension, and the combined partial outputs are summed
over TP afterwards as in one EP rank (megacpm.parallel.plans.plan_moe).

Expert gradients are complete within an EP group (every token of the group reached its expert) and
summed over the expert-data-parallel ranks that hold the same experts (ParamSpec reduced_over
"expert_dp"); ZeRO-1 shards their optimizer state over those ranks.

``exchange_rows`` is torch.distributed's all_to_all_single; ``exchange_rows_by_gather`` the
fallback for a backend without it (an all-gather of every rank's padded rows, then each rank keeps
what was addressed to it: correct, and ep times the traffic).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megacpm.model.moe import MoEMLP, grouped_swiglu
from megacpm.parallel.mappings import Group, group_size
from megacpm.parallel.param_spec import ParamSpec, has_param_spec, param_spec, set_param_spec

EXPERT_WEIGHTS = ("w1", "w3", "w2")
# Backends whose all_to_all_single takes uneven splits.
ALL_TO_ALL_BACKENDS = ("nccl", "gloo", "mpi", "ucc")
Exchange = Callable[[torch.Tensor, Sequence[int], Sequence[int], Group], torch.Tensor]


def exchange_rows(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
                  group: Group) -> torch.Tensor:
    """Rows input_splits[r] of ``x`` (in order) to rank r; rows output_splits[r] from rank r."""
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), list(output_splits), list(input_splits), group=group)
    return out


def exchange_rows_by_gather(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
                            group: Group) -> torch.Tensor:
    """exchange_rows by all-gathers (for a backend without all_to_all_single)."""
    size, me = group_size(group), dist.get_rank(group)
    splits = torch.tensor(list(input_splits), dtype=torch.int64, device=x.device)
    all_splits = [torch.empty_like(splits) for _ in range(size)]
    dist.all_gather(all_splits, splits, group=group)
    longest = max(int(s.sum()) for s in all_splits)
    padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))]).contiguous()
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded, group=group)
    pieces = []
    for source, (rows, source_splits) in enumerate(zip(gathered, all_splits)):
        start = int(source_splits[:me].sum())
        pieces.append(rows[start:start + int(source_splits[me])])
        assert pieces[-1].shape[0] == output_splits[source]
    return torch.cat(pieces)


def default_exchange(group: Group) -> Exchange:
    """all_to_all_single where the group's backend has it, the gather fallback elsewhere."""
    return exchange_rows if dist.get_backend(group) in ALL_TO_ALL_BACKENDS else exchange_rows_by_gather


class _Dispatch(torch.autograd.Function):
    """exchange(x, output_splits, input_splits); backward: the inverse exchange of the gradient."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, exchange):
        ctx.splits, ctx.group, ctx.exchange = (output_splits, input_splits), group, exchange
        return exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return ctx.exchange(grad, input_splits, output_splits, ctx.group), None, None, None, None


class ExpertParallelExperts:
    """An MoE layer's ``run_experts`` under expert parallelism: (assignments sorted by expert,
    counts per expert [E], this rank's w1, w3, w2 of its E / ep experts) -> the assignments'
    outputs, in the input's order."""

    def __init__(self, group: Group, num_experts: int, exchange: Exchange):
        self.group, self.exchange = group, exchange
        self.ep = group_size(group)
        self.local_experts = num_experts // self.ep

    def __call__(self, x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                 w2: torch.Tensor) -> torch.Tensor:
        ep, local = self.ep, self.local_experts
        send = counts.view(ep, local)  # [peer, its expert]: rows this rank sends
        recv = self.exchange(send, [1] * ep, [1] * ep, self.group)  # [peer, my expert]: rows it sends me
        input_splits, output_splits = send.sum(1).tolist(), recv.sum(1).tolist()  # the host read
        received = _Dispatch.apply(x, output_splits, input_splits, self.group, self.exchange)
        # Received rows come by peer, then by my expert: regroup them by expert for the grouped GEMM.
        expert_of = torch.arange(local, device=x.device).repeat(ep).repeat_interleave(recv.flatten())
        by_expert = torch.argsort(expert_of, stable=True)
        out = grouped_swiglu(received[by_expert], recv.sum(0), w1, w3, w2)
        back = torch.empty_like(by_expert)
        back[by_expert] = torch.arange(by_expert.numel(), device=x.device)
        return _Dispatch.apply(out[back], input_splits, output_splits, self.group, self.exchange)


def plan_expert_parallel(model: nn.Module, group: Group, exchange: Optional[Exchange] = None) -> None:
    """Every MoEMLP of ``model`` keeps the experts of this rank's EP position (a contiguous E / ep
    of them, after any TP split) and runs them through ExpertParallelExperts; every expert weight
    is declared split over "ep" along dim 0 and reduced over "expert_dp". Applied for every MoE
    model (ep = 1 included), so the experts' gradients and optimizer state always live in their
    own buffer."""
    ep = group_size(group)
    rank = dist.get_rank(group) if ep > 1 else 0
    for module in model.modules():
        if not isinstance(module, MoEMLP):
            continue
        per_rank = module.num_experts // ep
        for name in EXPERT_WEIGHTS:
            weight = getattr(module, name)
            base = param_spec(weight) if has_param_spec(weight) else ParamSpec()
            if ep > 1:
                weight = nn.Parameter(weight.data[rank * per_rank:(rank + 1) * per_rank].clone())
                setattr(module, name, weight)
            shard_dims = {**base.shard_dims, **({"ep": 0} if ep > 1 else {})}
            set_param_spec(weight, base.with_changes(shard_dims=shard_dims, reduced_over="expert_dp"))
        if ep > 1:
            module.run_experts = ExpertParallelExperts(group, module.num_experts, exchange or default_exchange(group))
