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

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from megacpm.config import Config
from megacpm.optim import param_groups
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.grad_buffer import GradBuffer
from megacpm.parallel.mappings import group_size
from megacpm.parallel.model import build_stages
from megacpm.parallel.pipeline import PipelineSpec, run_forward_only, run_pipeline
from megacpm.parallel.zero import DistributedAdamW

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
    """This rank's model chunks, gradient buffer and optimizer, and one training step over them.

    ``param_dtype`` bfloat16 gives Megatron's --bf16: bf16 parameters and activations, fp32 master
    weights and Adam state in the optimizer, fp32 gradient accumulation and reductions.
    """

    def __init__(self, cfg: Config, ctx: ParallelContext, generator: Optional[torch.Generator] = None,
                 param_dtype: torch.dtype = torch.float32):
        self.cfg, self.ctx, self.param_dtype = cfg, ctx, param_dtype
        p, t = cfg.parallel, cfg.train
        self.stages = build_stages(cfg.model, ctx, sequence_parallel=p.sp,
                                   activation_checkpointing=t.activation_checkpointing, generator=generator)
        self.model = nn.ModuleList(self.stages).to(device=ctx.device, dtype=param_dtype)
        params = list(self.model.parameters())
        # Each micro-batch's loss is divided by the global target count: DP gradients are summed.
        self.grad_buffer = GradBuffer(params, ctx.group("dp"), shard_buckets=p.zero1, average=False)
        self.optimizer = DistributedAdamW(self.grad_buffer, param_groups(self.model, cfg.model, cfg.optim),
                                          betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
        self.partial_tp = [q for q in params if getattr(q, "sequence_parallel", False)
                           or getattr(q, "tp_partial_grad", False)]
        self.shared_embedding = [q for q in params if getattr(q, "shared_embedding", False)]

    # -- forward / backward ------------------------------------------------------------------------
    def _forward_backward(self, inputs: List[torch.Tensor], labels: List[torch.Tensor], num_targets: int) -> torch.Tensor:
        """Sum over this rank's micro-batches of loss_sum / num_targets (non-zero on the last stage)."""
        last = self.stages[-1]
        layout = self.ctx.layout
        if layout.pp == 1:
            total = torch.zeros((), device=self.ctx.device)
            for i, (x, y) in enumerate(zip(inputs, labels)):
                self.grad_buffer.sync_enabled = i == len(inputs) - 1  # reduce only after the last one
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
            return last.loss(output, labels[index], IGNORE_INDEX)[0] / num_targets

        total = run_pipeline(self.stages, spec, inputs, loss_fn)
        return total if total is not None else torch.zeros((), device=self.ctx.device)

    def _pipeline_spec(self, micro_batch: torch.Tensor) -> PipelineSpec:
        layout = self.ctx.layout
        tp = layout.tp if self.cfg.parallel.sp else 1
        micro, seq = micro_batch.shape
        return PipelineSpec(pp=layout.pp, rank=self.ctx.pp_rank, vpp=layout.vpp, group=self.ctx.group("pp"),
                            group_ranks=self.ctx.group_ranks["pp"],
                            activation_shape=(micro, seq // tp, self.cfg.model.hidden_size),
                            dtype=self.param_dtype, device=self.ctx.device)

    def _split(self, inputs: torch.Tensor, labels: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """This DP rank's share of a batch, as micro-batches of inputs and of labels on the device."""
        dp, micro = self.ctx.layout.dp, self.cfg.train.micro_batch_size

        def mine(rows: torch.Tensor) -> List[torch.Tensor]:
            local = rows.split(rows.shape[0] // dp)[self.ctx.dp_rank].to(self.ctx.device)
            return [m.contiguous() for m in local.split(micro)]

        return mine(inputs), mine(labels)

    # -- gradients -------------------------------------------------------------------------------
    def _complete_partial_grads(self) -> None:
        # On the fp32 buffer views: a bf16 parameter's .grad is a copy.
        for param in self.partial_tp:
            _all_reduce(param.main_grad, self.ctx.group("tp"))
        for param in self.shared_embedding:
            _all_reduce(param.main_grad, self.ctx.group("embedding"))

    def _grad_norm(self) -> torch.Tensor:
        squares = self.optimizer.grad_norm_squared(lambda q: counted_once(q, self.ctx))
        if self.optimizer.sharded:
            group = dist.group.WORLD  # disjoint slices over DP x model-parallel
        else:
            group = self.ctx.group("model_parallel")  # DP replicas hold identical gradients
        return _all_reduce(squares, group if self.ctx.world_size > 1 else None).sqrt()

    def _clip(self, norm: torch.Tensor) -> None:
        max_norm = self.cfg.optim.clip_grad
        if max_norm > 0 and torch.isfinite(norm) and norm > max_norm:
            self.optimizer.scale_grads(float(max_norm / norm))

    # -- the step --------------------------------------------------------------------------------
    def step(self, samples: torch.Tensor, lr: float) -> Tuple[float, float]:
        """Train on one global batch [global_batch_size, seq_len + 1]; returns (loss, grad_norm).

        The returned values are global (identical on every rank). The update is skipped when either
        is not finite, so the caller can stop without having changed the weights.
        """
        loss, norm = self.compute_gradients(samples)
        if math.isfinite(loss) and math.isfinite(float(norm)):
            self.apply_gradients(norm, lr)
        return loss, float(norm)

    def compute_gradients(self, samples: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """Forward and backward of every micro-batch, gradients reduced and completed: (global loss,
        global gradient norm as a tensor)."""
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
        return float(loss) / self.ctx.layout.tp, norm

    def apply_gradients(self, norm: torch.Tensor, lr: float) -> None:
        """Clip to optim.clip_grad by the global norm, then the AdamW update at ``lr``."""
        self._clip(norm)
        self.optimizer.step(lr)

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
        return self.optimizer.step_count

    def optimizer_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """{parameter name: {"master", "exp_avg", "exp_avg_sq"}}, fp32, shaped like this rank's
        parameter (collective over DP under ZeRO-1)."""
        by_id = self.optimizer.full_state()
        return {name: by_id[id(q)] for name, q in self.named_parameters().items()}

    def load_optimizer_state(self, state: Dict[str, Dict[str, torch.Tensor]], optimizer_steps: int) -> None:
        """The inverse of optimizer_state; the parameters become the loaded masters."""
        named = self.named_parameters()
        self.optimizer.load_state({id(named[name]): tensors for name, tensors in state.items()}, optimizer_steps)

    def named_parameters(self) -> Dict[str, nn.Parameter]:
        """Model-space names (chunks share one namespace: layer indices are global)."""
        named: Dict[str, nn.Parameter] = {}
        for stage in self.stages:
            named.update(dict(stage.named_parameters()))
        return named
