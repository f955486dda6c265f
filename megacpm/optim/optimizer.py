"""AdamW with muP parameter groups (MiniCPM, Table 7).

Every 2-D weight trains at lr / m (m = hidden_size / dim_model_base), other parameters at lr. Norm
gains get no weight decay. Each group carries ``lr_scale``, so one global LR from the schedule sets
them all (``set_lr``).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from megacpm.config import ModelConfig, OptimConfig

EMBEDDING = "embed_tokens.weight"


def param_groups(model: nn.Module, model_cfg: ModelConfig, optim_cfg: OptimConfig) -> List[Dict]:
    matrix_scale = 1.0 / model_cfg.width_mult
    groups: Dict[str, Dict] = {
        "matrix": {"params": [], "lr_scale": matrix_scale, "weight_decay": optim_cfg.weight_decay},
        "embedding": {"params": [], "lr_scale": 1.0, "weight_decay": optim_cfg.weight_decay},
        "vector": {"params": [], "lr_scale": 1.0, "weight_decay": 0.0},
    }
    seen = set()
    for name, param in model.named_parameters():  # tied parameters are yielded once
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim < 2:
            group = "vector"
        elif name == EMBEDDING and not model_cfg.mup_embedding_as_matrix:
            group = "embedding"
        else:
            group = "matrix"
        groups[group]["params"].append(param)
    return [{"name": name, **group} for name, group in groups.items() if group["params"]]


def build_optimizer(model: nn.Module, model_cfg: ModelConfig, optim_cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, model_cfg, optim_cfg)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                             eps=optim_cfg.eps, fused=True if on_cuda else None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR from the global LR (the 2-D weights get lr / m)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
