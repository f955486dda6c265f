"""MiniCPM under tensor, sequence and pipeline parallelism.

Every rank builds and initialises the full model from the same generator (so a parallel run starts
from exactly the single-process weights), then ``shard_tensor_parallel`` swaps its projections for
column/row-parallel layers holding this rank's shard, and ``build_stages`` keeps only the layers of
this rank's pipeline chunks. Parameter names stay those of the single-process model
(``layers.7.self_attn.q_proj.weight``), and each sharded parameter records how it was cut
(``tp_shard_dim``), so checkpoints can be written in model space.

Communication per decoder layer (forward), Megatron's count: without SP one all-reduce after the
attention output projection and one after the MLP down projection; with SP an all-gather before each
of the two column-parallel groups and a reduce-scatter after each row-parallel layer.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megacpm.config import ModelConfig
from megacpm.model import MiniCPM
from megacpm.model.minicpm import RMSNorm
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megacpm.parallel.mappings import Group, copy_to_tp, gather_from_sp, group_size


class ParallelInputNorm(RMSNorm):
    """An RMSNorm whose output feeds column-parallel layers: all-gathered over the sequence (SP) or
    entered into the TP region once (so q, k and v share one backward all-reduce)."""

    def __init__(self, norm: RMSNorm, group: Group, sequence_parallel: bool):
        super().__init__(norm.weight.shape[0], norm.eps)
        with torch.no_grad():
            self.weight.copy_(norm.weight)
        self.group, self.sequence_parallel = group, sequence_parallel
        # Under SP each rank sees only its sequence shard: the gain's gradient is partial.
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return gather_from_sp(y, self.group) if self.sequence_parallel else copy_to_tp(y, self.group)


class ReplicatedKVProjection(nn.Module):
    """k or v projection when tp does not divide the kv heads: the full weight on every rank, of
    whose output this rank keeps the kv heads its query heads use. Its gradient is partial per
    rank (summed over TP by the trainer)."""

    def __init__(self, full_weight: torch.Tensor, head_dim: int, first_head: int, num_heads: int):
        super().__init__()
        self.weight = nn.Parameter(full_weight.clone())
        self.weight.tp_partial_grad = True
        self.lo, self.hi = first_head * head_dim, (first_head + num_heads) * head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[self.lo:self.hi])


def shard_tensor_parallel(model: MiniCPM, group: Group, sequence_parallel: bool = False) -> None:
    """Replace the model's projections, norms and embedding by their TP versions, in place."""
    tp = group_size(group)
    if tp == 1 and not sequence_parallel:
        return
    cfg: ModelConfig = model.cfg
    rank = dist.get_rank(group) if tp > 1 else 0
    column = dict(group=group)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layer.input_layernorm = ParallelInputNorm(layer.input_layernorm, group, sequence_parallel)
        layer.post_attention_layernorm = ParallelInputNorm(layer.post_attention_layernorm, group, sequence_parallel)
        attn.tp_rank = rank  # its heads are this rank's: dropout draws from this rank's stream
        attn.q_proj = ColumnParallelLinear.from_full(attn.q_proj.weight.data, input_ready=True, **column)
        if cfg.num_key_value_heads % tp == 0:
            attn.k_proj = ColumnParallelLinear.from_full(attn.k_proj.weight.data, input_ready=True, **column)
            attn.v_proj = ColumnParallelLinear.from_full(attn.v_proj.weight.data, input_ready=True, **column)
        else:
            q_per_rank = cfg.num_attention_heads // tp
            group_of_q = cfg.num_attention_heads // cfg.num_key_value_heads
            first_kv = rank * q_per_rank // group_of_q
            num_kv = max(1, q_per_rank // group_of_q)
            attn.k_proj = ReplicatedKVProjection(attn.k_proj.weight.data, cfg.head_dim, first_kv, num_kv)
            attn.v_proj = ReplicatedKVProjection(attn.v_proj.weight.data, cfg.head_dim, first_kv, num_kv)
        attn.o_proj = RowParallelLinear.from_full(attn.o_proj.weight.data, sequence_parallel=sequence_parallel, **column)
        mlp.gate_proj = ColumnParallelLinear.from_full(mlp.gate_proj.weight.data, input_ready=True, **column)
        mlp.up_proj = ColumnParallelLinear.from_full(mlp.up_proj.weight.data, input_ready=True, **column)
        mlp.down_proj = RowParallelLinear.from_full(mlp.down_proj.weight.data, sequence_parallel=sequence_parallel, **column)
    model.embed_tokens = VocabParallelEmbedding.from_full(model.embed_tokens.weight.data, group,
                                                         sequence_parallel=sequence_parallel)
    model.norm = ParallelInputNorm(model.norm, group, sequence_parallel)
    if model.lm_head is not None:
        model.lm_head = ColumnParallelLinear.from_full(model.lm_head.weight.data, input_ready=True,
                                                       pad_outputs=True, **column)


def stage_layers(num_layers: int, pp: int, vpp: int, pp_rank: int, chunk: int) -> range:
    """Global indices of the decoder layers of virtual stage chunk * pp + pp_rank."""
    per_stage = num_layers // (pp * vpp)
    stage = chunk * pp + pp_rank
    return range(stage * per_stage, (stage + 1) * per_stage)


class PipelineStage(nn.Module):
    """One model chunk: [embedding] -> its decoder layers -> [final norm + LM head loss]."""

    def __init__(self, model: MiniCPM, layer_ids: range, first: bool, last: bool, tp_group: Group,
                 sequence_parallel: bool, activation_checkpointing: bool = False, pipeline_size: int = 1):
        super().__init__()
        self.cfg = model.cfg
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.activation_checkpointing = activation_checkpointing
        self.rotary = model.rotary
        self.embed_tokens = model.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.lm_head = None
        self.tied_embedding = None
        if last:
            if model.lm_head is not None:
                self.lm_head = model.lm_head
            elif pipeline_size > 1:
                # Tied embedding across pipeline ranks: the last stage keeps its own copy as the
                # output weight; the trainer sums the two copies' gradients over the embedding group.
                self.lm_head = ColumnParallelLinear(self.cfg.hidden_size, self.cfg.vocab_size, tp_group,
                                                    input_ready=True, pad_outputs=True)
                with torch.no_grad():
                    self.lm_head.weight.copy_(model.embed_tokens.weight)
                self.lm_head.weight.shared_embedding = True
                self.lm_head.weight.embedding_copy = True  # counted once, on the first stage
            elif not first:
                self.tied_embedding = model.embed_tokens  # same rank: the very same parameter

    @property
    def output_weight(self) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head.weight
        return (self.embed_tokens or self.tied_embedding).weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            h = self.embed_tokens(x) * self.cfg.embedding_scale
            seq_len = x.shape[1]
        else:
            h = x
            seq_len = h.shape[1] * (group_size(self.tp_group) if self.sequence_parallel else 1)
        cos, sin = self.rotary(seq_len, h.device)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers.values():
            h = checkpoint(layer, h, cos, sin, use_reentrant=False) if recompute else layer(h, cos, sin)
        return self.norm(h) if self.norm is not None else h

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
        """(summed token loss, token count) from the last stage's normed hidden states."""
        from megacpm.kernels import fused_linear_cross_entropy, vocab_parallel_cross_entropy

        scale = 1.0 / self.cfg.width_mult
        labels = labels.reshape(-1)
        count = (labels != ignore_index).sum()
        hidden = hidden.flatten(0, 1)
        if group_size(self.tp_group) == 1:
            loss = fused_linear_cross_entropy(hidden, self.output_weight, labels, logit_scale=scale,
                                              ignore_index=ignore_index, reduction="sum")
        else:
            weight = self.output_weight
            logits_shard = F.linear(hidden, weight)
            valid = getattr(weight, "tp_valid_rows", weight.shape[0])
            if valid < weight.shape[0]:
                # Padding rows of the vocabulary: probability zero, so no loss and no gradient.
                logits_shard = logits_shard.clone()
                logits_shard[:, valid:] = float("-inf")
            loss = vocab_parallel_cross_entropy(logits_shard, labels, self.tp_group, logit_scale=scale,
                                                ignore_index=ignore_index, reduction="sum")
        return loss, count


def build_stages(cfg: ModelConfig, ctx: ParallelContext, sequence_parallel: bool = False,
                 activation_checkpointing: bool = False,
                 generator: Optional[torch.Generator] = None) -> List[PipelineStage]:
    """This rank's model chunks (one per virtual stage it runs), initialised as one process would."""
    model = MiniCPM(cfg)
    model.init_weights(generator)
    shard_tensor_parallel(model, ctx.group("tp"), sequence_parallel)
    pp, vpp = ctx.layout.pp, ctx.layout.vpp
    if cfg.tie_word_embeddings and pp > 1:
        model.embed_tokens.weight.shared_embedding = True  # summed with the last stage's copy
    stages = []
    for chunk in range(vpp):
        virtual = chunk * pp + ctx.pp_rank
        stages.append(PipelineStage(
            model, stage_layers(cfg.num_hidden_layers, pp, vpp, ctx.pp_rank, chunk),
            first=virtual == 0, last=virtual == pp * vpp - 1, tp_group=ctx.group("tp"),
            sequence_parallel=sequence_parallel, activation_checkpointing=activation_checkpointing,
            pipeline_size=pp))
    return stages
