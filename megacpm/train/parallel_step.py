"""One optimizer step under any layout: tensor (+ sequence), pipeline (1F1B / interleaved) and data
parallelism, with or without ZeRO-1.

Global correctness, whatever the layout:
- every rank reads the same global batch (token ids are cheap) and takes its data-parallel slice, so
  the sample order does not depend on the layout;
- the loss is the token-weighted mean over all micro-batches and DP ranks: each micro-batch's summed
  loss is divided by the global count of target tokens;
- partial gradients are completed before clipping: sequence-parallel norm gains and replicated kv
  projections are summed over TP, the two copies of a tied embedding over the embedding group;
- the gradient norm counts every parameter once (a TP-replicated parameter on TP rank 0 only, the
  tied embedding on the first stage only).
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from megacpm.config import Config
from megacpm.optim import param_groups, set_lr
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.grad_buffer import GradBuffer
from megacpm.parallel.mappings import group_size
from megacpm.parallel.model import build_stages
from megacpm.parallel.pipeline import PipelineSpec, run_pipeline
from megacpm.parallel.zero import ZeroAdamW

IGNORE_INDEX = -100


def _all_reduce(value: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(value, group=group)
    return value


def counted_once(param: nn.Parameter, ctx: ParallelContext) -> bool:
    """Whether this rank's copy of ``param`` counts in the global gradient norm."""
    if getattr(param, "embedding_copy", False):
        return False  # the last stage's copy of a tied embedding: counted on the first stage
    if getattr(param, "tp_shard_dim", None) is None and ctx.tp_rank != 0:
        return False  # replicated over TP: identical (once completed) on every TP rank
    return True


class ParallelStep:
    def __init__(self, cfg: Config, ctx: ParallelContext, generator: Optional[torch.Generator] = None,
                 amp_dtype: Optional[torch.dtype] = None):
        self.cfg, self.ctx, self.amp_dtype = cfg, ctx, amp_dtype
        p, t = cfg.parallel, cfg.train
        self.stages = build_stages(cfg.model, ctx, sequence_parallel=p.sp,
                                   activation_checkpointing=t.activation_checkpointing, generator=generator)
        self.model = nn.ModuleList(self.stages).to(ctx.device)
        params = list(self.model.parameters())
        self.grad_buffer = GradBuffer(params, ctx.group("dp"), shard_buckets=p.zero1)
        groups = param_groups(self.model, cfg.model, cfg.optim)
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        if p.zero1:
            self.optimizer = ZeroAdamW(self.grad_buffer, groups, betas=betas, eps=cfg.optim.eps)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=betas, eps=cfg.optim.eps)
        self.partial_tp = [q for q in params if getattr(q, "sequence_parallel", False)
                           or getattr(q, "tp_partial_grad", False)]
        self.shared_embedding = [q for q in params if getattr(q, "shared_embedding", False)]

    # -- forward / backward ------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=self.amp_dtype)

    def _forward_backward(self, inputs: List[torch.Tensor], labels: List[torch.Tensor], num_targets: int) -> torch.Tensor:
        """Sum over this rank's micro-batches of loss_sum / num_targets (non-zero on the last stage)."""
        last = self.stages[-1]
        layout = self.ctx.layout
        if layout.pp == 1:
            total = torch.zeros((), device=self.ctx.device)
            for i, (x, y) in enumerate(zip(inputs, labels)):
                self.grad_buffer.sync_enabled = i == len(inputs) - 1  # reduce only after the last one
                with self._autocast():
                    loss_sum, _ = last.loss(last(x), y, IGNORE_INDEX)
                loss = loss_sum / num_targets
                loss.backward()
                total += loss.detach()
            return total
        # Pipeline: each parameter's gradient arrives once per micro-batch, interleaved across
        # chunks; the buckets are reduced after the schedule (finish()).
        self.grad_buffer.sync_enabled = False
        tp = layout.tp if self.cfg.parallel.sp else 1
        micro, seq = inputs[0].shape
        spec = PipelineSpec(pp=layout.pp, rank=self.ctx.pp_rank, vpp=layout.vpp, group=self.ctx.group("pp"),
                            group_ranks=self.ctx.group_ranks["pp"],
                            activation_shape=(micro, seq // tp, self.cfg.model.hidden_size),
                            dtype=torch.float32, device=self.ctx.device)

        def loss_fn(output: torch.Tensor, index: int) -> torch.Tensor:
            with self._autocast():
                return last.loss(output, labels[index], IGNORE_INDEX)[0] / num_targets

        with self._autocast():
            total = run_pipeline(self.stages, spec, inputs, loss_fn)
        return total if total is not None else torch.zeros((), device=self.ctx.device)

    # -- gradients -------------------------------------------------------------------------------
    def _complete_partial_grads(self) -> None:
        for param in self.partial_tp:
            _all_reduce(param.grad, self.ctx.group("tp"))
        for param in self.shared_embedding:
            _all_reduce(param.grad, self.ctx.group("embedding"))

    def _grad_norm(self) -> torch.Tensor:
        if self.cfg.parallel.zero1:
            squares = torch.zeros((), device=self.ctx.device)
            for seg in self.optimizer.segments:
                if counted_once(seg.param, self.ctx):
                    grad = self.grad_buffer.buffer[seg.buffer_start:seg.buffer_start + seg.length]
                    squares += grad.square().sum()
            group = None if self.ctx.world_size == 1 else dist.group.WORLD  # slices over DP x model
        else:
            squares = sum((q.grad.float().square().sum() for q in self.model.parameters()
                           if q.grad is not None and counted_once(q, self.ctx)),
                          torch.zeros((), device=self.ctx.device))
            group = self.ctx.group("model_parallel")  # DP replicas hold identical gradients
        return _all_reduce(squares, group).sqrt()

    def _clip(self, norm: torch.Tensor) -> None:
        max_norm = self.cfg.optim.clip_grad
        if max_norm <= 0 or not torch.isfinite(norm) or norm <= max_norm:
            return
        factor = float(max_norm / norm)
        if self.cfg.parallel.zero1:
            self.optimizer.scale_grads(factor)
        else:
            for q in self.model.parameters():
                if q.grad is not None:
                    q.grad.mul_(factor)

    # -- the step --------------------------------------------------------------------------------
    def step(self, samples: torch.Tensor, lr: float) -> Tuple[float, float]:
        """Train on one global batch [global_batch_size, seq_len + 1]; returns (loss, grad_norm).

        The returned values are global (identical on every rank). The update is skipped when either
        is not finite, so the caller can stop without having changed the weights.
        """
        t, layout = self.cfg.train, self.ctx.layout
        num_targets = int((samples[:, 1:] != IGNORE_INDEX).sum())
        local = samples.split(samples.shape[0] // layout.dp)[self.ctx.dp_rank].to(self.ctx.device)
        micro = local.split(t.micro_batch_size)
        inputs = [m[:, :-1].contiguous() for m in micro]
        labels = [m[:, 1:].contiguous() for m in micro]
        self.grad_buffer.reset()
        self.model.train()
        partial_loss = self._forward_backward(inputs, labels, max(num_targets, 1))
        self.grad_buffer.finish()
        self._complete_partial_grads()
        norm = self._grad_norm()
        # The loss lives on the last stage's TP ranks (identical there), a DP share on each replica.
        loss = _all_reduce(partial_loss.detach().float().clone(), dist.group.WORLD if self.ctx.world_size > 1 else None)
        loss = float(loss) / layout.tp
        grad_norm = float(norm)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self._clip(norm)
            if self.cfg.parallel.zero1:
                self.optimizer.step(lr)
            else:
                set_lr(self.optimizer, lr)
                self.optimizer.step()
        return loss, grad_norm

    def named_parameters(self) -> Dict[str, nn.Parameter]:
        """Model-space names (chunks share one namespace: layer indices are global)."""
        named: Dict[str, nn.Parameter] = {}
        for stage in self.stages:
            named.update(dict(stage.named_parameters()))
        return named
