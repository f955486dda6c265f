"""Data-parallel gradient reduction: one contiguous fp32 buffer, cut into buckets, reduced as ready.

Every parameter gets ``main_grad``, an fp32 view into the buffer. A post-accumulate-grad hook adds
the parameter's fresh gradient into it and frees ``param.grad``; parameters are laid out in the
buffer in reverse order, the order the backward pass produces their gradients, so the first bucket
fills first. On the last micro-batch of a step (``sync_enabled``), a bucket's asynchronous
all-reduce starts as soon as its last gradient has arrived, overlapping the rest of the backward.
``finish()`` waits for the reductions and hands the averaged gradients to the optimizer as
``param.grad`` (views into the buffer: no copy in fp32).

Reductions are in fp32 whatever the parameter dtype, and no communication happens on the other
micro-batches (gradient accumulation stays local).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megacpm.parallel.mappings import Group, group_size

DEFAULT_BUCKET_BYTES = 40 * 2**20  # Megatron's default order of magnitude: big enough to saturate links


@dataclass
class Bucket:
    index: int
    start: int  # element offsets in the buffer
    end: int
    params: List[nn.Parameter] = field(default_factory=list)
    pending: int = 0  # gradients still to arrive this step
    handle: Optional[dist.Work] = None


class GradBuffer:
    def __init__(self, params: Sequence[nn.Parameter], group: Group, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 on_launch=None, shard_buckets: bool = False, average: bool = True):
        self.group = group
        self.dp = group_size(group)
        # average=True: each rank's loss is a mean over its own samples, so the replicas' gradients
        # are averaged. average=False: the loss is already divided by the global token count (the
        # trainer's token-weighted mean), so the replicas' gradients are summed.
        self.average = average
        # ZeRO-1: each bucket is padded to a multiple of dp and reduce-scattered, rank r owning the
        # r-th equal slice of every bucket (the slices may split a parameter).
        self.shard_buckets = shard_buckets
        self.params = [p for p in params if p.requires_grad]
        self.sync_enabled = True
        self._on_launch = on_launch  # test/accounting hook: called with each bucket as it launches
        device = self.params[0].device if self.params else torch.device("cpu")
        self.buckets: List[Bucket] = []
        self._bucket_of: Dict[int, Bucket] = {}
        self.offsets: Dict[int, int] = {}  # id(param) -> its first element in the buffer
        bucket_elems = max(1, bucket_bytes // 4)
        offset = 0
        current = Bucket(0, 0, 0)
        for param in reversed(self.params):  # the backward's order
            self.offsets[id(param)] = offset
            current.params.append(param)
            self._bucket_of[id(param)] = current
            offset += param.numel()
            current.end = offset
            if current.end - current.start >= bucket_elems:
                offset = current.end = self._padded(current.end, current.start)
                self.buckets.append(current)
                current = Bucket(len(self.buckets), offset, offset)
        if current.params:
            offset = current.end = self._padded(current.end, current.start)
            self.buckets.append(current)
        self.buffer = torch.zeros(offset, dtype=torch.float32, device=device)
        for param in self.params:
            start = self.offsets[id(param)]
            param.main_grad = self.buffer[start:start + param.numel()].view_as(param)
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self.params]
        self.reset()

    def _padded(self, end: int, start: int) -> int:
        if not self.shard_buckets:
            return end
        length = end - start
        return start + -(-length // self.dp) * self.dp

    def bucket_of(self, param: nn.Parameter) -> Bucket:
        return self._bucket_of[id(param)]

    def owned_range(self, bucket: Bucket, rank: int):
        """(start, end) buffer offsets of ``rank``'s slice of a bucket under ZeRO-1."""
        shard = (bucket.end - bucket.start) // self.dp
        return bucket.start + rank * shard, bucket.start + (rank + 1) * shard

    def reset(self) -> None:
        """Zero the accumulated gradients (the start of a step)."""
        self.buffer.zero_()
        for bucket in self.buckets:
            bucket.pending, bucket.handle = len(bucket.params), None
        for param in self.params:
            param.grad = None

    def _grad_ready(self, param: nn.Parameter) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None
        if not self.sync_enabled:
            return
        bucket = self._bucket_of[id(param)]
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        if self._on_launch is not None:
            self._on_launch(bucket)
        if self.dp == 1:
            return
        view = self.buffer[bucket.start:bucket.end]
        if self.average:
            view.div_(self.dp)  # scaled before the sum, so the fp32 sum cannot overflow
        if self.shard_buckets and dist.get_backend(self.group) != "gloo":
            start, end = self.owned_range(bucket, dist.get_rank(self.group))
            bucket.handle = dist.reduce_scatter_tensor(self.buffer[start:end], view, group=self.group,
                                                       async_op=True)
        else:  # gloo has no reduce-scatter: all-reduce gives every rank its slice too
            bucket.handle = dist.all_reduce(view, group=self.group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket (launching any whose gradients never all arrived) and expose grads."""
        for bucket in self.buckets:
            if bucket.handle is None and bucket.pending > 0:
                # Unused parameters (no gradient this step) still take part, as zeros.
                bucket.pending = 0
                self._launch(bucket)
            if bucket.handle is not None:
                bucket.handle.wait()
        for param in self.params:
            param.grad = param.main_grad if param.dtype == torch.float32 else param.main_grad.to(param.dtype)

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
