"""AdamW on fp32 master weights, over a GradBuffer: ZeRO-1 when the buffer is sharded over DP.

Rank r owns the r-th equal slice of every gradient bucket when the buffer is sharded
(GradBuffer(shard_buckets=True), ``parallel.zero1``), or every element otherwise. A slice may start
or end inside a parameter, so the owned range is kept as segments (parameter, element range), each
carrying its muP group's lr_scale and weight decay. A step: gradients arrive reduced (each rank holds
at least its slice, fp32), each rank runs AdamW on its slice in fp32, then the updated masters are
written into the parameters (all-gathered over DP first when sharded), cast to the parameters' dtype.

So bf16 parameters train on fp32 masters (Megatron's --bf16): updates smaller than bf16's resolution
still accumulate. Memory per parameter, ZeRO-1: 2 (bf16 weights) + 4 (fp32 grad buffer) + 12 / dp
(master copy and two moments); with fp32 weights 4 + 4 + 12 / dp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from megacpm.optim.grad_buffer import GradBuffer
from megacpm.parallel.mappings import group_size

STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


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


class DistributedAdamW:
    """The same update as torch.optim.AdamW, on fp32 masters of the elements this rank owns."""

    def __init__(self, grad_buffer: GradBuffer, param_groups: List[Dict], betas=(0.9, 0.95), eps: float = 1e-8):
        self.buffer = grad_buffer
        self.group = grad_buffer.group
        self.rank = dist.get_rank(self.group) if group_size(self.group) > 1 else 0
        # Only a sharded buffer spreads the state: otherwise every replica owns everything.
        self.sharded = grad_buffer.shard_buckets and group_size(self.group) > 1
        self.betas, self.eps = betas, eps
        self.step_count = 0
        settings = {id(p): (g.get("lr_scale", 1.0), g.get("weight_decay", 0.0))
                    for g in param_groups for p in g["params"]}
        self.segments: List[Segment] = []
        shard_len = 0
        for bucket in grad_buffer.buckets:
            own_start, own_end = grad_buffer.owned_range(bucket, self.rank) if self.sharded else (bucket.start, bucket.end)
            for param in bucket.params:
                p_start = grad_buffer.offsets[id(param)]
                lo, hi = max(own_start, p_start), min(own_end, p_start + param.numel())
                if lo >= hi:
                    continue
                lr_scale, weight_decay = settings[id(param)]
                self.segments.append(Segment(param, lo - p_start, hi - p_start, lo, shard_len, lr_scale,
                                             weight_decay))
                shard_len += hi - lo
        self._bucket_segments: Dict[int, List[Segment]] = {b.index: [] for b in grad_buffer.buckets}
        for seg in self.segments:
            self._bucket_segments[grad_buffer.bucket_of(seg.param).index].append(seg)
        device = grad_buffer.buffer.device
        self.master = torch.empty(shard_len, dtype=torch.float32, device=device)
        for seg in self.segments:  # from the parameters as initialised (Megatron's order: cast, then copy)
            self.master[seg.shard_start:seg.shard_start + seg.length] = \
                seg.param.detach().reshape(-1)[seg.param_start:seg.param_end].float()
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)

    def _grad(self, seg: Segment) -> torch.Tensor:
        return self.buffer.buffer[seg.buffer_start:seg.buffer_start + seg.length]

    def grad_norm_squared(self, counted=lambda param: True) -> torch.Tensor:
        """Sum of squares of this rank's gradient elements whose parameter is ``counted``.

        All-reduce it over DP x model-parallel when sharded, over model-parallel otherwise.
        """
        grads = [self._grad(seg) for seg in self.segments if counted(seg.param)]
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=self.master.device)
        # One fused reduction per segment and no gradient-sized temporaries (square() would make one).
        return torch.stack(torch._foreach_norm(grads)).square().sum()

    def scale_grads(self, factor: float) -> None:
        for seg in self.segments:
            self._grad(seg).mul_(factor)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        if not self.segments:
            self._publish_params()
            return
        self.step_count += 1
        beta1, beta2 = self.betas
        bias1 = 1 - beta1 ** self.step_count
        bias2_sqrt = math.sqrt(1 - beta2 ** self.step_count)
        views = [slice(seg.shard_start, seg.shard_start + seg.length) for seg in self.segments]
        masters = [self.master[v] for v in views]
        ms, vs = [self.exp_avg[v] for v in views], [self.exp_avg_sq[v] for v in views]
        grads = [self._grad(seg) for seg in self.segments]
        # One fused kernel per operation over all segments (torch.optim.AdamW's foreach path).
        torch._foreach_mul_(masters, [1 - lr * seg.lr_scale * seg.weight_decay for seg in self.segments])
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(masters, ms, denom, [-lr * seg.lr_scale / bias1 for seg in self.segments])
        self._publish_params()

    @torch.no_grad()
    def _publish_params(self) -> None:
        """The masters into the parameters (every rank's slices into every replica when sharded)."""
        if not self.sharded:
            for seg in self.segments:
                seg.param.view(-1)[seg.param_start:seg.param_end] = \
                    self.master[seg.shard_start:seg.shard_start + seg.length]
            return
        # Bucket by bucket (a parameter never straddles two), so the fp32 staging is one bucket,
        # not a second copy of the whole gradient buffer.
        for bucket in self.buffer.buckets:
            staging = torch.zeros(bucket.end - bucket.start, dtype=torch.float32, device=self.master.device)
            for seg in self._bucket_segments[bucket.index]:
                start = seg.buffer_start - bucket.start
                staging[start:start + seg.length] = self.master[seg.shard_start:seg.shard_start + seg.length]
            shards = [staging[lo - bucket.start:hi - bucket.start]
                      for lo, hi in (self.buffer.owned_range(bucket, r) for r in range(self.buffer.dp))]
            dist.all_gather(shards, shards[self.rank].clone(), group=self.group)
            for param in bucket.params:
                start = self.buffer.offsets[id(param)] - bucket.start
                param.data.copy_(staging[start:start + param.numel()].view_as(param))

    def _flat(self, shard: torch.Tensor) -> torch.Tensor:
        """A buffer-shaped fp32 tensor holding this rank's slices of ``shard`` (zeros elsewhere)."""
        flat = torch.zeros_like(self.buffer.buffer)
        for seg in self.segments:
            flat[seg.buffer_start:seg.buffer_start + seg.length] = shard[seg.shard_start:seg.shard_start + seg.length]
        return flat

    # -- checkpoints: the state seen in model space ---------------------------------------------------
    def full_state(self) -> Dict[int, Dict[str, torch.Tensor]]:
        """{id(param): {"master", "exp_avg", "exp_avg_sq"}}, each fp32 in the parameter's own shape.

        Collective over DP when sharded (the disjoint slices are summed into place), at the cost of
        three buffer-sized tensors for the duration of a save. The result does not depend on the DP
        size or on ZeRO, so a checkpoint reshards freely.
        """
        flats = {}
        for key in STATE_KEYS:
            flat = self._flat(getattr(self, key))
            if self.sharded:
                dist.all_reduce(flat, group=self.group)
            flats[key] = flat
        return {id(param): {key: flat[self.buffer.offsets[id(param)]:][:param.numel()].view_as(param)
                            for key, flat in flats.items()}
                for param in self.buffer.params}

    @torch.no_grad()
    def load_state(self, state: Dict[int, Dict[str, torch.Tensor]], step_count: int) -> None:
        """Take this rank's slices of full per-parameter state, and the parameters from the masters
        (collective over DP when sharded)."""
        self.step_count = step_count
        for seg in self.segments:
            sl = slice(seg.shard_start, seg.shard_start + seg.length)
            for key in STATE_KEYS:
                getattr(self, key)[sl] = state[id(seg.param)][key].reshape(-1)[seg.param_start:seg.param_end]
        self._publish_params()
