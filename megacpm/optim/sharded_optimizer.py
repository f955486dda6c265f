"""The optimizer side of a sharded model: gradient buffers, partial-gradient completion, the global
gradient norm, clipping and the fp32-master AdamW (ZeRO-1), all driven by the parameters' ParamSpecs.

- One GradBuffer (and its DistributedAdamW) per reduction group kind (``ParamSpec.reduced_over``:
  "dp_cp" for every dense parameter, the data-parallel and context-parallel ranks; "expert_dp" for
  MoE experts, summed over the ranks holding the same experts). ZeRO-1 shards over that group. Buffers SUM their
  replicas' gradients: an Objective divides each micro-batch's loss by the global normaliser of the
  step (megacpm.objectives), so the sum over replicas is the gradient of the global loss.
- Partial gradients (``ParamSpec.partial_over``: SP norm gains and replicated kv projections over
  "tp", the two copies of a tied embedding over "embedding") are completed before the norm.
- The norm counts every parameter once (``ParamSpec.counted_in_norm``): a buffer whose state is
  sharded over its group (ZeRO-1) sums its disjoint slices over that group first; a buffer whose
  parameters are also split across replicas (experts over "ep", SPLIT_ACROSS_REPLICAS) sums over
  that split next; then the sum over the ranks holding the distinct parts of one replica
  ("model_parallel": tp x pp).
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from megacpm.config import ModelConfig, OptimConfig
from megacpm.optim.distributed_adamw import DistributedAdamW
from megacpm.optim.grad_buffer import GradBuffer
from megacpm.optim.optimizer import param_groups
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.mappings import Group, group_size
from megacpm.parallel.param_spec import param_spec


# Buffers whose parameters are split over an axis of data-parallel ranks: the group kind holding
# their distinct parts within a replica's share of the world.
SPLIT_ACROSS_REPLICAS = {"expert_dp": "ep"}


def all_reduce_(value: torch.Tensor, group: Group) -> torch.Tensor:
    """In-place SUM over ``group`` (identity for None or a group of one)."""
    if group_size(group) > 1:
        dist.all_reduce(value, group=group)
    return value


class ShardedOptimizer:
    def __init__(self, named_params: Dict[str, nn.Parameter], ctx: ParallelContext, model_cfg: ModelConfig,
                 optim_cfg: OptimConfig, zero1: bool = False):
        self.ctx, self.optim_cfg = ctx, optim_cfg
        self.named_params = named_params
        groups = param_groups(named_params, model_cfg, optim_cfg)
        by_kind: Dict[str, List[nn.Parameter]] = {}
        for param in named_params.values():
            by_kind.setdefault(param_spec(param).reduced_over, []).append(param)
        self.buffers: Dict[str, GradBuffer] = {}
        self.adamw: Dict[str, DistributedAdamW] = {}
        for kind, params in by_kind.items():
            members = {id(p) for p in params}
            buffer = GradBuffer(params, ctx.group(kind), shard_buckets=zero1, average=False)
            kind_groups = [{**g, "params": [p for p in g["params"] if id(p) in members]} for g in groups]
            self.buffers[kind] = buffer
            self.adamw[kind] = DistributedAdamW(buffer, [g for g in kind_groups if g["params"]],
                                                betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps)
        self.partial = [(p, param_spec(p).partial_over) for p in named_params.values() if param_spec(p).partial_over]
        self._coords = ctx.layout.coords(ctx.rank)

    # -- gradients -------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for buffer in self.buffers.values():
            buffer.reset()

    def sync_gradients(self, enabled: bool) -> None:
        """Whether the buckets reduce as their gradients arrive (the step's last backward only)."""
        for buffer in self.buffers.values():
            buffer.sync_enabled = enabled

    def finish_gradients(self) -> None:
        """Wait for the reductions, then complete the partial gradients (on the fp32 buffer views:
        a bf16 parameter's .grad is a copy)."""
        for buffer in self.buffers.values():
            buffer.finish()
        for param, kinds in self.partial:
            for kind in kinds:
                all_reduce_(param.main_grad, self.ctx.group(kind))

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients (identical on every rank)."""
        counted = lambda q: param_spec(q).counted_in_norm(self._coords)  # noqa: E731
        total = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        for kind, adamw in self.adamw.items():
            squares = adamw.grad_norm_squared(counted)
            if adamw.sharded:
                all_reduce_(squares, self.ctx.group(kind))  # disjoint slices over the replicas
            if kind in SPLIT_ACROSS_REPLICAS:
                all_reduce_(squares, self.ctx.group(SPLIT_ACROSS_REPLICAS[kind]))  # each EP rank's own experts
            total += squares
        return all_reduce_(total, self.ctx.group("model_parallel")).sqrt()

    def clip(self, norm) -> None:
        """Scale the gradients to optim.clip_grad when the (finite) norm exceeds it."""
        max_norm, norm = self.optim_cfg.clip_grad, float(norm)  # one host read of the norm
        if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
            for adamw in self.adamw.values():
                adamw.scale_grads(max_norm / norm)

    def step(self, lr: float) -> None:
        for adamw in self.adamw.values():
            adamw.step(lr)

    # -- state in model space (checkpoints) ------------------------------------------------------
    @property
    def step_count(self) -> int:
        return next(iter(self.adamw.values())).step_count if self.adamw else 0

    def state_by_name(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """{parameter name: {"master", "exp_avg", "exp_avg_sq"}}, fp32, shaped like this rank's
        parameter (collective over each sharded buffer's group under ZeRO-1)."""
        by_id: Dict[int, Dict[str, torch.Tensor]] = {}
        for adamw in self.adamw.values():
            by_id.update(adamw.full_state())
        return {name: by_id[id(p)] for name, p in self.named_params.items()}

    def load_state_by_name(self, state: Dict[str, Dict[str, torch.Tensor]], step_count: int) -> None:
        """The inverse of state_by_name; the parameters become the loaded masters."""
        by_id = {id(self.named_params[name]): tensors for name, tensors in state.items()}
        for adamw in self.adamw.values():
            adamw.load_state(by_id, step_count)

