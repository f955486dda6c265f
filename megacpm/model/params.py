"""Parameter counts and shapes of a config, from the model built on the meta device (no memory)."""
from __future__ import annotations

from typing import Dict

import torch

from megacpm.config import ModelConfig
from megacpm.model.minicpm import MiniCPM

EXPERT_WEIGHTS = ("mlp.w1", "mlp.w2", "mlp.w3")  # megacpm.model.moe.MoEMLP's stacked experts


def parameter_shapes(cfg: ModelConfig) -> Dict[str, torch.Size]:
    """{model-space name: shape} of every parameter of the model ``cfg`` describes."""
    with torch.device("meta"):
        return {name: p.shape for name, p in MiniCPM(cfg).named_parameters()}


def count_parameters(cfg: ModelConfig) -> Dict[str, int]:
    """{"total", "non_embedding", "embedding", "experts", "active", "active_non_embedding"};
    "embedding" includes an untied LM head. "experts" counts the MoE layers' expert weights (0 for a
    dense model) and "active" the parameters one token uses: the total less the experts it is not
    routed to ((E - k) / E of them).

    Counting the real module (rather than a formula) keeps the numbers true to the model as built.
    """
    with torch.device("meta"):
        model = MiniCPM(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied weights are yielded once
    embedding = model.embed_tokens.weight.numel()
    if model.lm_head is not None:
        embedding += model.lm_head.weight.numel()
    experts = sum(p.numel() for name, p in model.named_parameters() if name.endswith(EXPERT_WEIGHTS))
    idle = experts * (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts if cfg.is_moe else 0
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding, "experts": experts,
            "active": total - idle, "active_non_embedding": total - embedding - idle}
