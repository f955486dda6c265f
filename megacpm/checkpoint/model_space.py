"""A run's weights and optimizer state as one DCP state dict in model space, whatever the layout.

Every tensor is keyed by its single-process parameter name (``layers.7.mlp.up_proj.weight``) and has
the single-process shape: a tensor-parallel shard is wrapped as a DTensor over the TP group with
``Shard(tp_shard_dim)``, which tells torch.distributed.checkpoint its global shape and offset; a
replicated tensor is a plain tensor (DCP writes one copy). A pipeline rank contributes only the
layers it holds. ZeRO-1 moments are gathered into parameter shape first. So a checkpoint written
under one (tp, pp, vpp, dp, zero1) loads under any other: DCP reads each rank's slice of each key.

Layout of the dict: {"model": {name: tensor}, "optim": {"exp_avg": {...}, "exp_avg_sq": {...}}}.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from megacpm.parallel.context import ParallelContext
from megacpm.parallel.zero import STATE_KEYS
from megacpm.train.parallel_step import ParallelStep

TIED_EMBEDDING = "embed_tokens.weight"
MOMENTS = ("exp_avg", "exp_avg_sq")
StateDict = Dict[str, Dict]


def _tp_mesh(ctx: ParallelContext):
    if ctx.layout.tp == 1:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(ctx.group("tp"), ctx.device.type)


def checkpoint_key(name: str, param: nn.Parameter) -> str:
    """The model-space name of a parameter (the last stage's copy of a tied embedding is the embedding)."""
    return TIED_EMBEDDING if getattr(param, "embedding_copy", False) else name


def _global_view(local: torch.Tensor, param: nn.Parameter, mesh) -> torch.Tensor:
    dim = getattr(param, "tp_shard_dim", None)
    if mesh is None or dim is None:
        return local
    from torch.distributed.tensor import DTensor, Shard

    if hasattr(param, "tp_global_rows"):
        # A padded vocabulary: only the real rows are model space, an uneven Shard(0) with
        # torch.chunk's split, which is how the padding was laid out.
        local = local.narrow(0, 0, param.tp_valid_rows)
        shape = torch.Size((param.tp_global_rows, *local.shape[1:]))
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
    # No communication: every shard has the same shape, so the global shape is local * tp.
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False)


def state_to_save(step: ParallelStep) -> StateDict:
    """The state dict to hand to dcp.save (collective over DP under ZeRO-1).

    The weights saved are the optimizer's fp32 masters (equal to the parameters in fp32 training,
    the exact values behind bf16 parameters otherwise).
    """
    mesh = _tp_mesh(step.ctx)
    state = step.optimizer_state()
    saved: StateDict = {"model": {}, "optim": {key: {} for key in MOMENTS}}
    for name, param in step.named_parameters().items():
        if getattr(param, "embedding_copy", False):
            continue  # the first stage's copy is saved; both are identical
        saved["model"][name] = _global_view(state[name]["master"], param, mesh)
        for key in MOMENTS:
            saved["optim"][key][name] = _global_view(state[name][key], param, mesh)
    return saved


def state_to_load(step: ParallelStep, with_optimizer: bool = True
                  ) -> Tuple[StateDict, Dict[str, Dict[str, torch.Tensor]]]:
    """(state dict for dcp.load, the local fp32 tensors it fills: {name: {"master", "exp_avg",
    "exp_avg_sq"}}), to hand to ``step.load_optimizer_state`` afterwards. Without the optimizer the
    moments stay zero (a fresh optimizer on loaded weights)."""
    mesh = _tp_mesh(step.ctx)
    target: StateDict = {"model": {}}
    if with_optimizer:
        target["optim"] = {key: {} for key in MOMENTS}
    local: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, param in step.named_parameters().items():
        key = checkpoint_key(name, param)
        local[name] = {m: torch.zeros_like(param, dtype=torch.float32) for m in STATE_KEYS}
        target["model"][key] = _global_view(local[name]["master"], param, mesh)
        for m in MOMENTS if with_optimizer else ():
            target["optim"][m][key] = _global_view(local[name][m], param, mesh)
    return target, local


def _host_copy(value):
    from torch.distributed.tensor import DTensor

    if isinstance(value, dict):
        return {key: _host_copy(item) for key, item in value.items()}
    if isinstance(value, DTensor):
        local = value.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(local, value.device_mesh, value.placements, run_check=False,
                                  shape=value.shape, stride=value.stride())
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return value


class HostCopyStager:
    """dcp.async_save's staging step: one host copy of every tensor (DTensor shards kept as shards),
    owning its memory, so the background write is immune to the training that goes on. (DCP's own
    stager copies storages, which fails on views into the flat ZeRO and gradient buffers.)"""

    _synchronize_after_execute = False

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def stage(self, state_dict: StateDict) -> StateDict:
        return _host_copy(state_dict)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass

