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
from megacpm.parallel.pipeline import PipelineSpec, run_forward_only, run_pipeline
from megacpm.parallel.zero import ZeroAdamW

IGNORE_INDEX = -100
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW state kept per parameter


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
        # Each micro-batch's loss is divided by the global target count: DP gradients are summed.
        self.grad_buffer = GradBuffer(params, ctx.group("dp"), shard_buckets=p.zero1, average=False)
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
        spec = self._pipeline_spec(inputs[0])

        def loss_fn(output: torch.Tensor, index: int) -> torch.Tensor:
            with self._autocast():
                return last.loss(output, labels[index], IGNORE_INDEX)[0] / num_targets

        with self._autocast():
            total = run_pipeline(self.stages, spec, inputs, loss_fn)
        return total if total is not None else torch.zeros((), device=self.ctx.device)

    def _pipeline_spec(self, micro_batch: torch.Tensor) -> PipelineSpec:
        layout = self.ctx.layout
        tp = layout.tp if self.cfg.parallel.sp else 1
        micro, seq = micro_batch.shape
        return PipelineSpec(pp=layout.pp, rank=self.ctx.pp_rank, vpp=layout.vpp, group=self.ctx.group("pp"),
                            group_ranks=self.ctx.group_ranks["pp"],
                            activation_shape=(micro, seq // tp, self.cfg.model.hidden_size),
                            dtype=torch.float32, device=self.ctx.device)

    def _split(self, inputs: torch.Tensor, labels: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """This DP rank's share of a batch, as micro-batches of inputs and of labels on the device."""
        dp, micro = self.ctx.layout.dp, self.cfg.train.micro_batch_size

        def mine(rows: torch.Tensor) -> List[torch.Tensor]:
            local = rows.split(rows.shape[0] // dp)[self.ctx.dp_rank].to(self.ctx.device)
            return [m.contiguous() for m in local.split(micro)]

        return mine(inputs), mine(labels)

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
        layout = self.ctx.layout
        num_targets = int((samples[:, 1:] != IGNORE_INDEX).sum())
        inputs, labels = self._split(samples[:, :-1], samples[:, 1:])
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

    @torch.no_grad()
    def evaluate(self, samples: torch.Tensor) -> Tuple[float, int]:
        """(summed token loss, target count) of a batch [batch, seq_len + 1], global on every rank.

        The batch is split over DP like a training batch; under PP the micro-batches flow through a
        forward-only pipeline. A batch that does not fill dp * micro_batch_size rows evenly is padded
        with rows whose targets are all ignored, so the result does not depend on the layout.
        """
        rows = samples.shape[0]
        per_round = self.ctx.layout.dp * self.cfg.train.micro_batch_size
        padded = -(-rows // per_round) * per_round
        samples = torch.cat([samples, samples[:1].expand(padded - rows, -1)])
        targets = samples[:, 1:].clone()
        targets[rows:] = IGNORE_INDEX
        inputs, labels = self._split(samples[:, :-1], targets)
        last = self.stages[-1]
        self.model.eval()
        with self._autocast():
            if self.ctx.layout.pp == 1:
                total = sum((last.loss(last(x), y, IGNORE_INDEX)[0].float() for x, y in zip(inputs, labels)),
                            torch.zeros((), device=self.ctx.device))
            else:
                total = run_forward_only(self.stages, self._pipeline_spec(inputs[0]), inputs,
                                         lambda out, i: last.loss(out, labels[i], IGNORE_INDEX)[0].float())
        total = torch.zeros((), device=self.ctx.device) if total is None else total.float()
        # Held on the last stage's TP ranks (identical there): sum over the world, divide by tp.
        total = _all_reduce(total, dist.group.WORLD if self.ctx.world_size > 1 else None)
        return float(total) / self.ctx.layout.tp, int((targets != IGNORE_INDEX).sum())

    # -- optimizer state in model space (checkpoints) -----------------------------------------------
    @property
    def optimizer_steps(self) -> int:
        if isinstance(self.optimizer, ZeroAdamW):
            return self.optimizer.step_count
        steps = [int(state["step"]) for state in self.optimizer.state.values() if "step" in state]
        return max(steps, default=0)

    def optimizer_moments(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """{parameter name: {"exp_avg", "exp_avg_sq"}} shaped like this rank's parameter (collective
        over DP under ZeRO-1). Zeros before the first step."""
        if isinstance(self.optimizer, ZeroAdamW):
            by_id = self.optimizer.full_moments()
            return {name: by_id[id(q)] for name, q in self.named_parameters().items()}
        moments = {}
        for name, q in self.named_parameters().items():
            state = self.optimizer.state.get(q, {})
            moments[name] = {key: state[key] if key in state else torch.zeros_like(q, memory_format=torch.preserve_format)
                             for key in MOMENTS}
        return moments

    @torch.no_grad()
    def load_optimizer_moments(self, moments: Dict[str, Dict[str, torch.Tensor]], optimizer_steps: int) -> None:
        named = self.named_parameters()
        if isinstance(self.optimizer, ZeroAdamW):
            self.optimizer.load_moments({id(named[name]): m for name, m in moments.items()}, optimizer_steps)
            return
        for name, q in named.items():
            state = self.optimizer.state[q]
            for key in MOMENTS:
                if key in state:
                    state[key].copy_(moments[name][key])
                else:
                    state[key] = moments[name][key].clone()
            # torch.optim.AdamW keeps the step count per parameter, as a float tensor.
            state["step"] = torch.tensor(float(optimizer_steps))

    def weights_loaded(self) -> None:
        """Call after writing the parameters in place (a checkpoint load): ZeRO's fp32 masters follow."""
        if isinstance(self.optimizer, ZeroAdamW):
            self.optimizer.sync_master_from_params()

    def named_parameters(self) -> Dict[str, nn.Parameter]:
        """Model-space names (chunks share one namespace: layer indices are global)."""
        named: Dict[str, nn.Parameter] = {}
        for stage in self.stages:
            named.update(dict(stage.named_parameters()))
        return named
