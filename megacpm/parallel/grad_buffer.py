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
                 on_launch=None):
        self.group = group
        self.dp = group_size(group)
        self.params = [p for p in params if p.requires_grad]
        self.sync_enabled = True
        self._on_launch = on_launch  # test/accounting hook: called with each bucket as it launches
        device = self.params[0].device if self.params else torch.device("cpu")
        total = sum(p.numel() for p in self.params)
        self.buffer = torch.zeros(total, dtype=torch.float32, device=device)
        self.buckets: List[Bucket] = []
        self._bucket_of: Dict[int, Bucket] = {}
        bucket_elems = max(1, bucket_bytes // 4)
        offset = 0
        current = Bucket(0, 0, 0)
        for param in reversed(self.params):  # the backward's order
            param.main_grad = self.buffer[offset:offset + param.numel()].view_as(param)
            current.params.append(param)
            self._bucket_of[id(param)] = current
            offset += param.numel()
            current.end = offset
            if current.end - current.start >= bucket_elems:
                self.buckets.append(current)
                current = Bucket(len(self.buckets), offset, offset)
        if current.params:
            self.buckets.append(current)
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self.params]
        self.reset()

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
        view.div_(self.dp)  # average: scale first so the fp32 sum cannot overflow
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
