"""AdamW with muP parameter groups (MiniCPM, Table 7).

Every 2-D weight trains at lr / m (m = hidden_size / dim_model_base; 1 without muP), other
parameters at lr; ``optim.mup_lr_scaling`` false trains every group at lr (MiniCPM's DPO). Norm gains get no weight decay. Each group carries ``lr_scale``, so the one
global LR of the schedule sets them all (``set_lr``).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Union

import torch
from torch import nn

from megacpm.config import ModelConfig, OptimConfig
from megacpm.parallel.param_spec import has_param_spec, param_spec

EMBEDDING = "embed_tokens.weight"
# An untied LM head trains under the embedding's rule: it begins as the tied embedding's copy when
# a branch unties (megacpm.checkpoint.reshape), so its learning rate does not jump, and with
# model.mup_embedding_as_matrix false it is muP's readout (its 1/m is in the forward: lr unscaled).
EMBEDDING_RULE = (EMBEDDING, "lm_head.weight")


def _is_embedding(name: str) -> bool:
    # Suffix match: wrappers (DDP's "module.", torch.compile's "_orig_mod.") prefix the names.
    return any(name == kind or name.endswith("." + kind) for kind in EMBEDDING_RULE)


def _named(model: Union[nn.Module, Mapping[str, nn.Parameter]]):
    if isinstance(model, Mapping):
        return list(model.items())
    # The embedding is known by identity, whatever alias of a tied parameter comes first.
    return list(model.named_parameters(remove_duplicate=False))


def param_groups(model: Union[nn.Module, Mapping[str, nn.Parameter]], model_cfg: ModelConfig,
                 optim_cfg: OptimConfig) -> List[Dict]:
    """The "matrix" (lr / m), "embedding" (lr) and "vector" (lr, no weight decay) groups of a
    module or of {name: parameter}; empty groups are omitted and every parameter appears once.

    A pipeline's last stage holds a copy of a tied embedding (its ParamSpec's copy_of), an untied
    model an LM head: the embedding's rules apply to both."""
    named = _named(model)
    embedding_ids = {id(p) for name, p in named
                     if _is_embedding(name) or (has_param_spec(p) and param_spec(p).copy_of == EMBEDDING)}
    groups: Dict[str, Dict] = {
        "matrix": {"params": [], "lr_scale": 1.0 / model_cfg.width_mult if optim_cfg.mup_lr_scaling else 1.0,
                   "weight_decay": optim_cfg.weight_decay},
        "embedding": {"params": [], "lr_scale": 1.0, "weight_decay": optim_cfg.weight_decay},
        "vector": {"params": [], "lr_scale": 1.0, "weight_decay": 0.0},
    }
    seen = set()
    for _, param in named:
        if id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim < 2:
            group = "vector"  # RMSNorm gains
        elif id(param) in embedding_ids and not model_cfg.mup_embedding_as_matrix:
            group = "embedding"
        else:
            group = "matrix"
        groups[group]["params"].append(param)
    return [{"name": name, **group} for name, group in groups.items() if group["params"]]


def build_optimizer(model: nn.Module, model_cfg: ModelConfig, optim_cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, model_cfg, optim_cfg)
    # The fused kernel is CUDA-only; elsewhere torch picks its default (foreach where supported).
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                                  eps=optim_cfg.eps, fused=True if on_cuda else None)
    set_lr(optimizer, optim_cfg.lr)  # scaled LRs from the start, not only after the first set_lr
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR from the global LR (the 2-D weights get lr / m)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
