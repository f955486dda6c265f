"""muP initialisation, MiniCPM's training rule (paper, Table 7).

Every 2-D weight ~ N(0, (initializer_range / sqrt(m))^2) with m = hidden_size / dim_model_base;
RMSNorm gains = 1. The embedding follows the 2-D rule when ``mup_embedding_as_matrix`` (the paper's
literal wording), else N(0, initializer_range^2). Without muP (m = 1) every 2-D weight is
N(0, initializer_range^2). This is deliberately not the released inference code's
``_init_weights`` (plain N(0, 0.1) everywhere), which is not how the models were trained.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from megacpm.config import ModelConfig

EMBEDDING_WEIGHT = "embed_tokens.weight"


def is_mup_matrix(name: str, param: torch.Tensor, cfg: ModelConfig) -> bool:
    """Whether muP's 2-D rules (init std / sqrt(m), lr / m) apply to this parameter."""
    if param.ndim < 2:
        return False
    return name != EMBEDDING_WEIGHT or cfg.mup_embedding_as_matrix


def init_std(name: str, param: torch.Tensor, cfg: ModelConfig) -> Optional[float]:
    """The init standard deviation of a weight, or None for a gain that starts at 1."""
    if param.ndim < 2:
        return None
    if is_mup_matrix(name, param, cfg):
        return cfg.initializer_range / math.sqrt(cfg.width_mult)
    return cfg.initializer_range


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, generator: Optional[torch.Generator] = None) -> None:
    """Initialise ``model`` in place, in ``named_parameters`` order (tied weights once).

    Samples are drawn on the CPU (from ``generator`` when given, else torch's default generator)
    and copied to each parameter's device and dtype, so a seed gives the same weights everywhere.
    """
    for name, param in model.named_parameters():
        std = init_std(name, param, cfg)
        if std is None:
            param.fill_(1.0)
            continue
        sample = torch.empty(param.shape, dtype=torch.float32)
        sample.normal_(mean=0.0, std=std, generator=generator)
        param.copy_(sample)
