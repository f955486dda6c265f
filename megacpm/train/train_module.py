"""One training step under any layout: the sharded model, the optimizer side and the objective,
composed.

    module = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(seed))
    metrics = module.step(batch, lr)   # {"loss": ..., "grad_norm": ..., objective metrics}

Global correctness, whatever the layout:
- every rank reads the same global batch (token ids are cheap) and takes its share
  (megacpm.data.batch.shard_batch), so the sample order does not depend on the layout;
- the objective's normaliser comes from the global batch, and each micro-batch back-propagates
  its summed loss divided by it (megacpm.objectives.base);
- partial gradients are completed and the norm counts every parameter once, as its ParamSpec
  declares (megacpm.optim.sharded_optimizer);
- the objective's statistics are summed over micro-batches and ranks before its metrics are
  taken, so every rank reports (and decides on) the same numbers;
- an MoE model's routing statistics (megacpm.model.moe_step.MoEStep) travel in the same
  all-reduce: its metrics, and the router biases of auxiliary-loss-free balancing, come from the
  global counts, so every rank moves its biases alike.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from megacpm.config import Config
from megacpm.data.batch import Batch, shard_batch
from megacpm.model.moe_step import MoEStep
from megacpm.objectives import Objective, build_objective
from megacpm.optim.sharded_optimizer import ShardedOptimizer
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.mappings import reduce_from_cp
from megacpm.parallel.sharded_model import ShardedModel

# Axes over whose ranks the last stage's statistics are identical copies (each tensor-parallel rank
# computes the same vocab-parallel loss): the world sum counts them that many times. A
# whole-sequence objective's are copies over the context-parallel ranks too.
STATS_REPLICATED_OVER = ("tp",)
WHOLE_SEQUENCE_STATS_REPLICATED_OVER = ("tp", "cp")


class TrainModule:
    """This rank's ShardedModel, ShardedOptimizer and Objective, and one step over them.

    ``param_dtype`` bfloat16 gives Megatron's --bf16: bf16 parameters and activations, fp32 master
    weights and Adam state in the optimizer, fp32 gradient accumulation and reductions.
    """

    def __init__(self, cfg: Config, ctx: ParallelContext, generator: Optional[torch.Generator] = None,
                 param_dtype: torch.dtype = torch.float32, objective: Optional[Objective] = None):
        self.cfg, self.ctx = cfg, ctx
        p, t = cfg.parallel, cfg.train
        self.model = ShardedModel(cfg.model, ctx, sequence_parallel=p.sp,
                                  activation_checkpointing=t.activation_checkpointing, generator=generator,
                                  param_dtype=param_dtype, compile=t.compile,
                                  context_parallel_attention=p.cp_attention)
        self.optimizer = ShardedOptimizer(self.model.params_by_name(), ctx, cfg.model, cfg.optim, zero1=p.zero1)
        self.objective = objective or build_objective(cfg.objective)
        # Evaluation's objective: the training one, with the loss by position when asked for.
        self.eval_objective = (build_objective(cfg.objective, t.eval_position_buckets, t.seq_len)
                               if t.eval_position_buckets and objective is None else self.objective)
        for each in (self.objective, self.eval_objective):
            if each.whole_sequence:
                each.sequence_sum = partial(reduce_from_cp, group=ctx.group("cp"))
        # The last step's global assignments per (layer, expert), for the router-bias update that
        # follows its optimizer step (None: a dense model, or no step yet).
        self._expert_counts: Optional[torch.Tensor] = None

    def load_initial_weights(self, source) -> None:
        """Fine-tuning's start (train.init_from): the weights of ``source`` (a
        megacpm.checkpoint.InitSource) into every rank's shards, and the optimizer's fp32 masters
        made from them (its moments zero, its step 0): the masters were copied from the parameters
        when the optimizer was built, and the first step would otherwise publish those back."""
        from megacpm.checkpoint import load_initial_weights  # the checkpoint layer, loaded when used

        load_initial_weights(source, self.cfg.model, self.model)
        fresh = {}
        for name, param in self.model.params_by_name().items():
            master = param.detach().float()
            fresh[name] = {"master": master, "exp_avg": torch.zeros_like(master),
                           "exp_avg_sq": torch.zeros_like(master)}
        self.optimizer.load_state_by_name(fresh, 0)

    @property
    def optimizer_steps(self) -> int:
        return self.optimizer.step_count

    # -- batches ---------------------------------------------------------------------------------
    @property
    def micro_batch_rows(self) -> int:
        """Rows of a micro-batch: train.micro_batch_size samples, a sample's rows kept together."""
        return self.cfg.train.micro_batch_size * self.objective.rows_per_sample

    def _micro_batches(self, batch: Batch):
        layout = self.ctx.layout
        local = shard_batch(batch, self.ctx.dp_rank, layout.dp, self.ctx.coord("cp"), layout.cp)
        return [micro.to(self.ctx.device).contiguous() for micro in local.split_rows(self.micro_batch_rows)]

    def _accumulator(self, objective: Objective):
        """(statistics summed over this rank's micro-batches, the loss_fn for the model runner
        that fills them): a micro-batch's summed loss divided by ``scale``."""
        stats = torch.zeros(len(objective.stat_names), dtype=torch.float32, device=self.ctx.device)

        def run(micro_batches, scale):
            def loss_fn(chunk, hidden, index):
                loss_sum, micro_stats = objective.loss(chunk, hidden, micro_batches[index])
                stats.add_(torch.stack([micro_stats[n].float() for n in objective.stat_names]))
                return loss_sum / scale
            return loss_fn

        return stats, run

    def _moe_step(self, micro_batches: Sequence[Batch], batch: Batch) -> Optional[MoEStep]:
        """An MoE model's bookkeeping for one step: each micro-batch weighted by its share of the
        global batch's tokens, the router gradient shared by the TP ranks that route alike, the
        expert counts completed over the cp ranks that hold a micro-batch's tokens between them."""
        m = self.cfg.model
        if not m.is_moe:
            return None
        return MoEStep(m.num_hidden_layers, m.num_experts, [micro.input_ids.numel() for micro in micro_batches],
                       global_tokens=batch.input_ids.numel(), aux_coeff=m.moe_aux_loss_coeff,
                       z_coeff=m.moe_z_loss_coeff, grad_share=self.ctx.layout.tp, device=self.ctx.device,
                       sum_over_sequence=partial(reduce_from_cp, group=self.ctx.group("cp")))

    def _global_metrics(self, objective: Objective, stats: torch.Tensor, normaliser: float,
                        moe: Optional[MoEStep] = None) -> Dict[str, float]:
        """The objective's metrics from its statistics summed over this rank's micro-batches and
        then over all ranks (ranks without the last stage contribute zeros), with an MoE model's
        routing metrics from its records summed the same way (one all-reduce for both)."""
        values = stats.clone() if moe is None else torch.cat([stats, moe.totals().flatten()])
        if self.ctx.world_size > 1:
            dist.all_reduce(values)
        replicated_over = (WHOLE_SEQUENCE_STATS_REPLICATED_OVER if objective.whole_sequence
                           else STATS_REPLICATED_OVER)
        replicas = math.prod(self.ctx.layout.size(axis) for axis in replicated_over)
        values = values / replicas
        count = len(objective.stat_names)
        totals = {n: v for n, v in zip(objective.stat_names, values[:count].tolist())}
        metrics = objective.metrics(totals, normaliser)
        if moe is not None:
            moe_totals = values[count:].view(moe.records.shape[1:])
            metrics.update(MoEStep.metrics(moe_totals, range(moe.num_layers)))
            self._expert_counts = moe_totals[:, :moe.num_experts]
        return metrics

    # -- the step --------------------------------------------------------------------------------
    def step(self, batch: Batch, lr: float) -> Dict[str, float]:
        """Train on one global batch; returns the step's metrics ("loss", "grad_norm" and the
        objective's), global and identical on every rank. The update is skipped when the loss or
        the norm is not finite, so the caller can stop without having changed the weights."""
        metrics, norm = self.compute_gradients(batch)
        if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
            self.apply_gradients(metrics["grad_norm"], lr)  # the norm as read once, a float
        return metrics

    def compute_gradients(self, batch: Batch):
        """Forward and backward of every micro-batch, gradients reduced and completed: (metrics
        with "grad_norm", the global norm as a tensor)."""
        normaliser = self.objective.normaliser(batch)
        micro_batches = self._micro_batches(batch)
        moe = self._moe_step(micro_batches, batch)
        stats, loss_fn_for = self._accumulator(self.objective)
        loss_fn = loss_fn_for(micro_batches, normaliser)
        self.optimizer.zero_grad()
        if self.ctx.layout.pp == 1:
            last = len(micro_batches) - 1
            before_backward = lambda i: self.optimizer.sync_gradients(i == last)  # noqa: E731
        else:
            # Pipeline: each parameter's gradient arrives once per micro-batch, interleaved across
            # chunks; the buckets are reduced after the schedule (finish_gradients).
            self.optimizer.sync_gradients(False)
            before_backward = None
        self.model.forward_backward(micro_batches, loss_fn, before_backward, moe)
        self.optimizer.finish_gradients()
        norm = self.optimizer.grad_norm()
        metrics = self._global_metrics(self.objective, stats, normaliser, moe)
        metrics["grad_norm"] = float(norm)
        return metrics, norm

    def apply_gradients(self, norm, lr: float) -> None:
        """Clip to optim.clip_grad by the global norm, then the AdamW update at ``lr``."""
        self.optimizer.clip(norm)
        self.optimizer.step(lr)
        self._balance_routers()

    @torch.no_grad()
    def _balance_routers(self) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing, after the step's update: each router bias
        moves by model.moe_router_bias_update_rate towards balance, b_e += rate * sign(mean load -
        load_e), from the step's global assignment counts (identical on every rank)."""
        rate = self.cfg.model.moe_router_bias_update_rate
        counts, self._expert_counts = self._expert_counts, None
        if not rate or counts is None:
            return
        for index, mlp in self.model.moe_layers().items():
            load = counts[index].to(mlp.router_bias.device)
            mlp.router_bias.add_(rate * torch.sign(load.mean() - load))

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> Dict[str, float]:
        """The objective's metrics of a batch, global on every rank, without training.

        The batch is split over DP like a training batch; under PP the micro-batches flow through a
        forward-only pipeline. A batch that does not fill dp * micro_batch_size rows evenly is padded
        with rows whose labels are all ignored, so the result does not depend on the layout.
        """
        per_round = self.ctx.layout.dp * self.micro_batch_rows
        batch = batch.pad_rows(-(-batch.num_rows // per_round) * per_round)
        normaliser = self.eval_objective.normaliser(batch)
        micro_batches = self._micro_batches(batch)
        stats, loss_fn_for = self._accumulator(self.eval_objective)
        self.model.forward_only(micro_batches, loss_fn_for(micro_batches, 1.0))
        return self._global_metrics(self.eval_objective, stats, normaliser)
