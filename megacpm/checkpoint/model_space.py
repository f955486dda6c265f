"""A run's weights and optimizer state as one DCP state dict in model space, whatever the layout.

Every tensor is keyed by its single-process parameter name (``layers.7.mlp.up_proj.weight``) and has
the single-process shape: a tensor-parallel shard is wrapped as a DTensor over the TP group with
``Shard(dim)`` of its ParamSpec, which tells torch.distributed.checkpoint its global shape and offset; a
replicated tensor is a plain tensor (DCP writes one copy). A pipeline rank contributes only the
layers it holds. ZeRO-1 moments are gathered into parameter shape first. So a checkpoint written
under one (tp, pp, vpp, dp, zero1) loads under any other: DCP reads each rank's slice of each key.

Layout of the dict: {"model": {name: tensor}, "optim": {"exp_avg": {...}, "exp_avg_sq": {...}}}, and
for an MoE model {"buffers": {"layers.L.mlp.router_bias": tensor}} (replicated; the routing state
of auxiliary-loss-free balancing, part of the model's function).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from megacpm.optim.distributed_adamw import STATE_KEYS
from megacpm.optim.sharded_optimizer import ShardedOptimizer
from megacpm.parallel.sharded_model import ShardedModel

MOMENTS = ("exp_avg", "exp_avg_sq")
StateDict = Dict[str, Dict]


def state_to_save(model: ShardedModel, optimizer: ShardedOptimizer) -> StateDict:
    """The state dict to hand to dcp.save (collective over DP under ZeRO-1).

    The weights saved are the optimizer's fp32 masters (equal to the parameters in fp32 training,
    the exact values behind bf16 parameters otherwise). A copy (the last stage's tied embedding) is
    not saved: its original is.
    """
    meshes = model.checkpoint_meshes()
    state = optimizer.state_by_name()
    saved: StateDict = {"model": {}, "optim": {key: {} for key in MOMENTS}}
    for name, param in model.params_by_name().items():
        if model.model_space_name(name, param) != name:
            continue
        saved["model"][name] = model.global_view(state[name]["master"], param, meshes)
        for key in MOMENTS:
            saved["optim"][key][name] = model.global_view(state[name][key], param, meshes)
    buffers = model.router_biases()
    if buffers:
        saved["buffers"] = {name: buffer.detach().float() for name, buffer in buffers.items()}
    return saved


def state_to_load(model: ShardedModel, with_optimizer: bool = True
                  ) -> Tuple[StateDict, Dict[str, Dict[str, torch.Tensor]]]:
    """(state dict for dcp.load, the local fp32 tensors it fills: {name: {"master", "exp_avg",
    "exp_avg_sq"}}; an MoE model's router biases are loaded in place). Hand them to
    ``ShardedOptimizer.load_state_by_name`` afterwards, or copy the
    masters into the parameters for a model without an optimizer. Without the optimizer the
    moments stay zero (a fresh optimizer on loaded weights)."""
    meshes = model.checkpoint_meshes()
    target: StateDict = {"model": {}}
    if with_optimizer:
        target["optim"] = {key: {} for key in MOMENTS}
    local: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, param in model.params_by_name().items():
        key = model.model_space_name(name, param)
        local[name] = {m: torch.zeros_like(param, dtype=torch.float32) for m in STATE_KEYS}
        target["model"][key] = model.global_view(local[name]["master"], param, meshes)
        for m in MOMENTS if with_optimizer else ():
            target["optim"][m][key] = model.global_view(local[name][m], param, meshes)
    buffers = model.router_biases()
    if buffers:
        target["buffers"] = buffers  # loaded in place
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

