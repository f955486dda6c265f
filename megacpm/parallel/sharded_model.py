"""This rank's part of the model under any layout: its pipeline chunks, sharded by the TP plans, every
parameter declared by a ParamSpec, with model-space names and views.

Every rank builds and initialises the full model from the same generator (so a parallel run starts
from exactly the single-process weights), applies the tensor-parallel plans (megacpm.parallel.plans)
and keeps the chunks of its pipeline rank: virtual stage ``chunk * pp + pp_rank`` holds layers
``stage_layers(...)``. Parameter names stay those of the single-process model
(``layers.7.self_attn.q_proj.weight``). The sharded model runs micro-batches forward and backward
through the pipeline schedule (or a plain loop on one stage) and knows nothing of optimizers or
objectives: a frozen model (a DPO reference) is a ShardedModel alone, loaded by
megacpm.checkpoint.load_model_weights.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from megacpm.config import ModelConfig
from megacpm.data.batch import Batch
from megacpm.model import MiniCPM
from megacpm.model.compile import CompileStats, compile_blocks
from megacpm.model.moe import MoEMLP
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.context_parallel import plan_context_parallel
from megacpm.parallel.experts import plan_expert_parallel
from megacpm.parallel.layers import ColumnParallelLinear
from megacpm.parallel.param_spec import ParamSpec, has_param_spec, param_spec, set_param_spec
from megacpm.parallel.pipeline import PipelineSpec, run_forward_only, run_pipeline
from megacpm.parallel.plans import apply_tensor_parallel

TIED_EMBEDDING = "embed_tokens.weight"
# loss_fn(last chunk, its output hidden states, micro-batch index) -> scalar to back-propagate
LossFn = Callable[[MiniCPM, torch.Tensor, int], torch.Tensor]


def stage_layers(num_layers: int, pp: int, vpp: int, pp_rank: int, chunk: int) -> range:
    """Global indices of the decoder layers of virtual stage chunk * pp + pp_rank."""
    per_stage = num_layers // (pp * vpp)
    stage = chunk * pp + pp_rank
    return range(stage * per_stage, (stage + 1) * per_stage)


def _tied_output_copy(model: MiniCPM, ctx: ParallelContext) -> ColumnParallelLinear:
    """The last stage's own copy of a tied embedding, as its LM head; the two copies' gradients are
    summed over the embedding group, and only the first stage's is saved and counted."""
    cfg = model.cfg
    head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, ctx.group("tp"), input_ready=True, pad_outputs=True)
    with torch.no_grad():
        head.weight.copy_(model.embed_tokens.weight)
    spec = param_spec(head.weight)
    set_param_spec(head.weight, spec.with_changes(partial_over=("embedding",), copy_of=TIED_EMBEDDING))
    return head


class ShardedModel(nn.Module):
    """This rank's model chunks (one per virtual stage it runs), initialised as one process would."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, sequence_parallel: bool = False,
                 activation_checkpointing: bool = False, generator: Optional[torch.Generator] = None,
                 param_dtype: torch.dtype = torch.float32, compile: bool = False,
                 context_parallel_attention: str = "all_gather"):
        super().__init__()
        self.cfg, self.ctx, self.param_dtype = cfg, ctx, param_dtype
        self.sequence_parallel = sequence_parallel
        model = MiniCPM(cfg, activation_checkpointing=activation_checkpointing)
        model.init_weights(generator)
        apply_tensor_parallel(model, ctx.group("tp"), sequence_parallel)
        if cfg.is_moe:
            plan_expert_parallel(model, ctx.group("ep"))
        plan_context_parallel(model, ctx.group("cp"), context_parallel_attention)
        pp, vpp = ctx.layout.pp, ctx.layout.vpp
        tied_across_stages = cfg.tie_word_embeddings and pp > 1
        chunks = []
        for chunk in range(vpp):
            virtual = chunk * pp + ctx.pp_rank
            first, last = virtual == 0, virtual == pp * vpp - 1
            part = model.chunk(stage_layers(cfg.num_hidden_layers, pp, vpp, ctx.pp_rank, chunk), first, last)
            if last and tied_across_stages:
                part.lm_head = _tied_output_copy(model, ctx)
            chunks.append(part)
        self.chunks = nn.ModuleList(chunks).to(device=ctx.device, dtype=param_dtype)
        for mlp in self.moe_layers().values():
            mlp.router_bias = mlp.router_bias.float()  # small steps of a balancing rule: kept in fp32
        for name, param in self.params_by_name().items():
            if not has_param_spec(param):
                set_param_spec(param, ParamSpec())  # a single process, or a module TP leaves whole
            if name == TIED_EMBEDDING and tied_across_stages:
                set_param_spec(param, param_spec(param).with_changes(partial_over=("embedding",)))
        # Last: the blocks are compiled as they will run (sharded by the plans, on the device, in
        # the parameter dtype). None when eager.
        self.compile_stats: Optional[CompileStats] = compile_blocks(self.chunks) if compile else None

    # -- parameters in model space ---------------------------------------------------------------
    def params_by_name(self) -> Dict[str, nn.Parameter]:
        """{name: parameter} of this rank's chunks in the single-process model's namespace (layer
        indices are global; the last stage's tied copy appears as ``lm_head.weight``), each once."""
        named: Dict[str, nn.Parameter] = {}
        for chunk in self.chunks:
            named.update(dict(chunk.named_parameters()))
        return named

    def router_biases(self) -> Dict[str, torch.Tensor]:
        """{model-space name: buffer} of this rank's MoE router biases (auxiliary-loss-free
        balancing's state: it changes which experts are chosen, so checkpoints carry it)."""
        return {f"layers.{index}.mlp.router_bias": mlp.router_bias for index, mlp in self.moe_layers().items()}

    def moe_layers(self) -> Dict[int, MoEMLP]:
        """{global layer index: its MoEMLP} of this rank's chunks."""
        return {layer.index: layer.mlp for chunk in self.chunks for layer in chunk.layers if layer.is_moe}

    @staticmethod
    def model_space_name(name: str, param: nn.Parameter) -> str:
        """The name a parameter is saved and loaded under (a copy: the name of what it copies)."""
        return param_spec(param).copy_of or name

    def checkpoint_meshes(self) -> Dict[str, object]:
        """The DeviceMeshes model-space views are laid over: "tp" (None without tensor parallelism)
        and "experts" ([ep, tp] ranks holding one copy of every expert; None without expert
        parallelism). Collective on first use in each process group (DeviceMesh.from_group)."""
        from torch.distributed.device_mesh import DeviceMesh

        layout, device_type = self.ctx.layout, self.ctx.device.type
        meshes: Dict[str, object] = {"tp": None, "experts": None}
        if layout.tp > 1:
            meshes["tp"] = DeviceMesh.from_group(self.ctx.group("tp"), device_type)
        if layout.ep > 1:
            block = torch.tensor(layout.expert_block(self.ctx.rank))
            if layout.tp > 1:
                meshes["experts"] = DeviceMesh.from_group([self.ctx.group("ep"), self.ctx.group("tp")], device_type,
                                                          mesh=block, mesh_dim_names=("ep", "tp"))
            else:
                meshes["experts"] = DeviceMesh.from_group(self.ctx.group("ep"), device_type)
        return meshes

    def global_view(self, local: torch.Tensor, param: nn.Parameter, meshes: Dict[str, object]) -> torch.Tensor:
        """``local`` (shaped like this rank's ``param``) as a model-space tensor: a DTensor with
        Shard(dim) along each axis the parameter is split over (TP; EP and TP for experts), the plain
        tensor when replicated."""
        spec = param_spec(param)
        dim, mesh = spec.shard_dim("tp"), meshes["tp"]
        if spec.shard_dim("ep") is None and (mesh is None or dim is None):
            return local  # replicated: a plain tensor, no DTensor machinery
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if spec.shard_dim("ep") is not None:
            tp_dim = spec.shard_dim("tp")
            placements = [Shard(spec.shard_dim("ep"))]
            if self.ctx.layout.tp > 1:
                placements.append(Shard(tp_dim) if tp_dim is not None else Replicate())
            return DTensor.from_local(local, meshes["experts"], placements, run_check=False)
        if spec.padded_rows is not None:
            # A padded vocabulary: only the real rows are model space, an uneven Shard(0) with
            # torch.chunk's split, which is how the padding was laid out.
            global_rows, valid_rows = spec.padded_rows
            local = local.narrow(0, 0, valid_rows)
            shape = torch.Size((global_rows, *local.shape[1:]))
            stride = torch.empty(shape, device="meta").stride()
            return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
        # No communication: every shard has the same shape, so the global shape is the local one
        # times the split.
        return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False)

    # -- running micro-batches -------------------------------------------------------------------
    @property
    def last_chunk(self) -> MiniCPM:
        return self.chunks[-1]

    def _pipeline_spec(self, micro: Batch) -> PipelineSpec:
        layout = self.ctx.layout
        shards = layout.tp if self.sequence_parallel else 1
        rows, seq = micro.input_ids.shape
        return PipelineSpec(pp=layout.pp, rank=self.ctx.pp_rank, vpp=layout.vpp, group=self.ctx.group("pp"),
                            group_ranks=self.ctx.group_ranks["pp"],
                            activation_shape=(rows, seq // shards, self.cfg.hidden_size),
                            dtype=self.param_dtype, device=self.ctx.device)

    def _chunk_fns(self, micro_batches: Sequence[Batch], moe=None
                   ) -> List[Callable[[torch.Tensor, int], torch.Tensor]]:
        """Each chunk as the pipeline calls it: (input, micro-batch index) -> output, with that
        micro-batch's positions and document mask (every stage has them; only activations travel)
        and, training an MoE model, its view of the step's megacpm.model.moe_step.MoEStep."""
        def run(chunk: MiniCPM) -> Callable[[torch.Tensor, int], torch.Tensor]:
            return lambda x, i: chunk.hidden(x, micro_batches[i].position_ids, micro_batches[i].document_ids,
                                             None if moe is None else moe.micro(i))
        return [run(chunk) for chunk in self.chunks]

    def forward_backward(self, micro_batches: Sequence[Batch], loss_fn: LossFn,
                         before_backward: Optional[Callable[[int], None]] = None, moe=None) -> torch.Tensor:
        """Forward and backward of every micro-batch (its token ids, positions and document ids;
        the objective reads its labels), in the pipeline schedule's order under pp > 1. ``loss_fn``
        gives the scalar to back-propagate from the last chunk's output; ``before_backward(i)`` runs
        before micro-batch i's backward on a single stage (the gradient buffer syncs on the last
        one); ``moe`` (an MoE model's megacpm.model.moe_step.MoEStep) collects the routing statistics
        and attaches the auxiliary losses. Returns the sum of the detached losses on the rank holding
        the last stage, zero elsewhere."""
        last = self.last_chunk
        zero = torch.zeros((), device=self.ctx.device)
        self.train()
        chunk_fns = self._chunk_fns(micro_batches, moe)
        inputs = [micro.input_ids for micro in micro_batches]
        if self.ctx.layout.pp == 1:
            total = zero
            for i, micro_input in enumerate(inputs):
                loss = loss_fn(last, chunk_fns[0](micro_input, i), i)
                if before_backward is not None:
                    before_backward(i)
                loss.backward()
                total = total + loss.detach()
            return total
        total = run_pipeline(chunk_fns, self._pipeline_spec(micro_batches[0]), inputs,
                             lambda output, i: loss_fn(last, output, i))
        return total if total is not None else zero

    @torch.no_grad()
    def forward_only(self, micro_batches: Sequence[Batch], loss_fn: LossFn) -> torch.Tensor:
        """Evaluation (and scoring): every micro-batch forward through every stage; the summed
        ``loss_fn`` values on the last stage's ranks, zero elsewhere."""
        last = self.last_chunk
        self.eval()
        chunk_fns = self._chunk_fns(micro_batches)
        inputs = [micro.input_ids for micro in micro_batches]
        if self.ctx.layout.pp == 1:
            return sum((loss_fn(last, chunk_fns[0](x, i), i).float() for i, x in enumerate(inputs)),
                       torch.zeros((), device=self.ctx.device))
        total = run_forward_only(chunk_fns, self._pipeline_spec(micro_batches[0]), inputs,
                                 lambda output, i: loss_fn(last, output, i).float())
        return torch.zeros((), device=self.ctx.device) if total is None else total.float()
