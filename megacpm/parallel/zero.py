"""ZeRO-1: AdamW whose fp32 master weights and moments are sharded over the data-parallel group.

Rank r owns the r-th equal slice of every gradient bucket (GradBuffer with shard_buckets=True). A
slice may start or end inside a parameter, so the owned range is kept as segments
(parameter, element range) each carrying its muP group's lr_scale and weight decay. A step:
gradients arrive reduce-scattered (each rank holds its slice averaged), each rank runs AdamW on its
slice in fp32, then the updated slices are all-gathered into every replica's parameters.

Memory per parameter with fp32 params: 4 (weights) + 4 (grads) + 12 / dp (master copy and two
moments); with bf16 params it is Megatron's 6 + 12 / dp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from megacpm.parallel.grad_buffer import GradBuffer
from megacpm.parallel.mappings import group_size


@dataclass
class Segment:
    param: nn.Parameter
    param_start: int  # element range within the flattened parameter
    param_end: int
    buffer_start: int  # the same elements in the gradient buffer
    shard_start: int  # and in this rank's flat master/moment shard
    lr_scale: float
    weight_decay: float

    @property
    def length(self) -> int:
        return self.param_end - self.param_start


class ZeroAdamW:
    """AdamW over this rank's slice of a sharded GradBuffer; the same update as torch.optim.AdamW."""

    def __init__(self, grad_buffer: GradBuffer, param_groups: List[Dict], betas=(0.9, 0.95), eps: float = 1e-8):
        if not grad_buffer.shard_buckets:
            raise ValueError("ZeroAdamW needs a GradBuffer built with shard_buckets=True")
        self.buffer = grad_buffer
        self.group = grad_buffer.group
        self.rank = dist.get_rank(self.group) if group_size(self.group) > 1 else 0
        self.betas, self.eps = betas, eps
        self.step_count = 0
        settings = {id(p): (g.get("lr_scale", 1.0), g.get("weight_decay", 0.0))
                    for g in param_groups for p in g["params"]}
        self.segments: List[Segment] = []
        shard_len = 0
        for bucket in grad_buffer.buckets:
            own_start, own_end = grad_buffer.owned_range(bucket, self.rank)
            for param in bucket.params:
                p_start = grad_buffer.offsets[id(param)]
                lo, hi = max(own_start, p_start), min(own_end, p_start + param.numel())
                if lo >= hi:
                    continue
                lr_scale, weight_decay = settings[id(param)]
                self.segments.append(Segment(param, lo - p_start, hi - p_start, lo, shard_len, lr_scale,
                                             weight_decay))
                shard_len += hi - lo
        device = grad_buffer.buffer.device
        self.master = torch.empty(shard_len, dtype=torch.float32, device=device)
        self.sync_master_from_params()
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)

    def _grad(self, seg: Segment) -> torch.Tensor:
        return self.buffer.buffer[seg.buffer_start:seg.buffer_start + seg.length]

    def grad_norm_squared(self) -> torch.Tensor:
        """Sum of squares of this rank's gradient slice (all-reduce it over DP x model-parallel)."""
        total = torch.zeros((), dtype=torch.float32, device=self.master.device)
        for seg in self.segments:
            total += self._grad(seg).square().sum()
        return total

    def scale_grads(self, factor: float) -> None:
        for seg in self.segments:
            self._grad(seg).mul_(factor)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.step_count += 1
        beta1, beta2 = self.betas
        bias1 = 1 - beta1 ** self.step_count
        bias2_sqrt = math.sqrt(1 - beta2 ** self.step_count)
        for seg in self.segments:
            sl = slice(seg.shard_start, seg.shard_start + seg.length)
            master, m, v, grad = self.master[sl], self.exp_avg[sl], self.exp_avg_sq[sl], self._grad(seg)
            seg_lr = lr * seg.lr_scale
            master.mul_(1 - seg_lr * seg.weight_decay)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
            master.addcdiv_(m, denom, value=-seg_lr / bias1)
        self._all_gather_params()

    def _all_gather_params(self) -> None:
        """Every rank's updated slices into every replica's parameters, bucket by bucket."""
        dp = group_size(self.group)
        flat = torch.zeros_like(self.buffer.buffer)
        for seg in self.segments:
            flat[seg.buffer_start:seg.buffer_start + seg.length] = \
                self.master[seg.shard_start:seg.shard_start + seg.length]
        if dp > 1:
            for bucket in self.buffer.buckets:
                shards = [flat[slice(*self.buffer.owned_range(bucket, r))] for r in range(dp)]
                mine = shards[self.rank].clone()
                dist.all_gather(shards, mine, group=self.group)
        for param in self.buffer.params:
            start = self.buffer.offsets[id(param)]
            param.data.copy_(flat[start:start + param.numel()].view_as(param))

    # -- checkpoints: the sharded state seen in model space ------------------------------------------
    def full_moments(self) -> Dict[int, Dict[str, torch.Tensor]]:
        """Every parameter's exp_avg / exp_avg_sq in its own shape (DP slices summed into place).

        Collective over DP. Costs two flat buffers the size of this rank's gradient buffer for the
        duration of a save; the result is what torch.optim.AdamW would hold, so a checkpoint does not
        depend on the DP size or on ZeRO being on.
        """
        flats = {}
        for name, shard in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            flat = torch.zeros_like(self.buffer.buffer)
            for seg in self.segments:
                flat[seg.buffer_start:seg.buffer_start + seg.length] = shard[seg.shard_start:seg.shard_start + seg.length]
            if group_size(self.group) > 1:
                dist.all_reduce(flat, group=self.group)  # slices are disjoint: the sum assembles them
            flats[name] = flat
        moments = {}
        for param in self.buffer.params:
            start = self.buffer.offsets[id(param)]
            moments[id(param)] = {name: flat[start:start + param.numel()].view_as(param)
                                  for name, flat in flats.items()}
        return moments

    @torch.no_grad()
    def load_moments(self, moments: Dict[int, Dict[str, torch.Tensor]], step_count: int) -> None:
        """Take this rank's slices of full per-parameter moments."""
        self.step_count = step_count
        for seg in self.segments:
            sl = slice(seg.shard_start, seg.shard_start + seg.length)
            state = moments[id(seg.param)]
            self.exp_avg[sl] = state["exp_avg"].reshape(-1)[seg.param_start:seg.param_end]
            self.exp_avg_sq[sl] = state["exp_avg_sq"].reshape(-1)[seg.param_start:seg.param_end]

    @torch.no_grad()
    def sync_master_from_params(self) -> None:
        """Master weights := the parameters (after the parameters were loaded from a checkpoint)."""
        for seg in self.segments:
            self.master[seg.shard_start:seg.shard_start + seg.length] = \
                seg.param.detach().reshape(-1)[seg.param_start:seg.param_end].float()
