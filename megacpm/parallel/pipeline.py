"""Running a pipeline schedule: forward and backward of model chunks, activations over p2p.

Each rank holds ``vpp`` chunks (virtual stage = chunk * pp + rank). A forward receives its input
from the previous virtual stage (or takes the micro-batch on stage 0), runs the chunk and sends the
output on (or computes the loss on the last stage); a backward receives the output's gradient
(or starts from the loss), back-propagates and sends the input's gradient back.

Sends are asynchronous (``isend``) and receives block only for data the schedule needs next, which
is exactly the dependency order megacpm.parallel.pipeline_schedule.simulate proves deadlock-free.
Once a send has completed, the output's storage is released: only its autograd graph is kept for
the backward (Megatron's deallocate_output_tensor), so a stage holds each in-flight activation once.
This requires that a chunk's last operation does not save its own output for the backward (true of
the residual add that ends a decoder layer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megacpm.parallel.pipeline_schedule import build_schedule

# chunk(input, micro-batch index) -> output: the index lets a chunk read that micro-batch's own
# position and document ids, which every stage has (only activations travel between stages).
ChunkFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class PipelineSpec:
    pp: int
    rank: int  # this rank's pipeline stage
    vpp: int
    group: Optional[dist.ProcessGroup]
    group_ranks: List[int]  # global ranks of the pipeline group, by stage
    activation_shape: Tuple[int, ...]  # of one micro-batch's hidden states between stages
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def stages(self) -> int:
        return self.pp * self.vpp


def _tag(kind: int, micro_batch: int, stage: int, stages: int) -> int:
    # Unique per message; gloo matches on it, NCCL relies on the (identical) posting order.
    return (micro_batch * stages + stage) * 2 + kind


class _PendingSends:
    """Outstanding isends; a finished activation send releases the tensor's storage."""

    def __init__(self) -> None:
        self._items: List[Tuple[dist.Work, Optional[torch.Tensor]]] = []

    def add(self, work: dist.Work, release: Optional[torch.Tensor]) -> None:
        self._items.append((work, release))

    def poll(self) -> None:
        still = []
        for work, tensor in self._items:
            if work.is_completed():
                _release(tensor)
            else:
                still.append((work, tensor))
        self._items = still

    def drain(self) -> None:
        for work, tensor in self._items:
            work.wait()
            _release(tensor)
        self._items = []


def _release(tensor: Optional[torch.Tensor]) -> None:
    if tensor is not None:
        tensor.data = torch.empty((1,), dtype=tensor.dtype, device=tensor.device)


def _backward_through(output: torch.Tensor, grad: torch.Tensor) -> None:
    """Backward from an output whose storage was released (shape checks would reject it)."""
    # The engine call torch.autograd.backward makes, without its check that grad matches output's
    # (released) shape. Arguments: tensors, grads, keep_graph, create_graph, inputs,
    # allow_unreachable, accumulate_grad.
    torch.autograd.Variable._execution_engine.run_backward((output,), (grad,), False, False, (), True, True)


def run_pipeline(chunks: Sequence[ChunkFn], spec: PipelineSpec, micro_batches: Sequence[torch.Tensor],
                 loss_fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Optional[torch.Tensor]:
    """Forward and backward of every micro-batch through this rank's chunks, in schedule order.

    ``micro_batches[i]`` is the input of virtual stage 0 (used on pipeline rank 0 only);
    ``loss_fn(output, i)`` turns the last stage's output into the scalar to back-propagate.
    Returns the sum of the losses on the rank holding the last stage, None elsewhere.
    """
    num_mb = len(micro_batches)
    schedule = build_schedule(spec.pp, spec.rank, num_mb, spec.vpp)
    prev_rank = spec.group_ranks[(spec.rank - 1) % spec.pp]
    next_rank = spec.group_ranks[(spec.rank + 1) % spec.pp]
    inputs: Dict[Tuple[int, int], torch.Tensor] = {}
    outputs: Dict[Tuple[int, int], torch.Tensor] = {}
    sends = _PendingSends()
    total_loss: Optional[torch.Tensor] = None
    for action in schedule:
        sends.poll()
        stage = action.chunk * spec.pp + spec.rank
        key = (action.micro_batch, action.chunk)
        if action.kind == "F":
            if stage == 0:
                chunk_input = micro_batches[action.micro_batch]
            else:
                chunk_input = torch.empty(spec.activation_shape, dtype=spec.dtype, device=spec.device)
                dist.recv(chunk_input, src=prev_rank, group=spec.group,
                          tag=_tag(0, action.micro_batch, stage - 1, spec.stages))
                chunk_input.requires_grad_()
            output = chunks[action.chunk](chunk_input, action.micro_batch)
            inputs[key] = chunk_input
            if stage == spec.stages - 1:
                loss = loss_fn(output, action.micro_batch)
                outputs[key] = loss
                total_loss = loss.detach() if total_loss is None else total_loss + loss.detach()
            else:
                output = output.contiguous()
                work = dist.isend(output.detach(), dst=next_rank, group=spec.group,
                                  tag=_tag(0, action.micro_batch, stage, spec.stages))
                sends.add(work, output)
                outputs[key] = output
        else:
            output = outputs.pop(key)
            chunk_input = inputs.pop(key)
            if stage == spec.stages - 1:
                output.backward()
            else:
                grad = torch.empty(spec.activation_shape, dtype=spec.dtype, device=spec.device)
                dist.recv(grad, src=next_rank, group=spec.group, tag=_tag(1, action.micro_batch, stage, spec.stages))
                _backward_through(output, grad)
            if stage > 0:
                work = dist.isend(chunk_input.grad.contiguous(), dst=prev_rank, group=spec.group,
                                  tag=_tag(1, action.micro_batch, stage - 1, spec.stages))
                sends.add(work, None)
    sends.drain()
    return total_loss


@torch.no_grad()
def run_forward_only(chunks: Sequence[ChunkFn], spec: PipelineSpec, micro_batches: Sequence[torch.Tensor],
                     loss_fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Optional[torch.Tensor]:
    """Evaluation: every micro-batch through every virtual stage, no backward.

    Each rank visits (micro-batch, chunk) in lexicographic order and sends asynchronously, so every
    receive waits only on work that comes earlier in that order on the previous rank: no deadlock,
    and no schedule is needed. Returns the summed losses on the last stage's rank, None elsewhere.
    """
    prev_rank = spec.group_ranks[(spec.rank - 1) % spec.pp]
    next_rank = spec.group_ranks[(spec.rank + 1) % spec.pp]
    sends = _PendingSends()
    total_loss: Optional[torch.Tensor] = None
    for index, micro_batch in enumerate(micro_batches):
        for chunk in range(spec.vpp):
            stage = chunk * spec.pp + spec.rank
            if stage == 0:
                chunk_input = micro_batch
            else:
                chunk_input = torch.empty(spec.activation_shape, dtype=spec.dtype, device=spec.device)
                dist.recv(chunk_input, src=prev_rank, group=spec.group, tag=_tag(0, index, stage - 1, spec.stages))
            output = chunks[chunk](chunk_input, index)
            if stage == spec.stages - 1:
                loss = loss_fn(output, index)
                total_loss = loss if total_loss is None else total_loss + loss
            else:
                output = output.contiguous()
                sends.add(dist.isend(output, dst=next_rank, group=spec.group,
                                     tag=_tag(0, index, stage, spec.stages)), output)
        sends.poll()
    sends.drain()
    return total_loss
