"""Parameter counts of a config, from the model built on the meta device (no memory)."""
from __future__ import annotations

from typing import Dict

import torch

from megacpm.config import ModelConfig
from megacpm.model.minicpm import MiniCPM


def count_parameters(cfg: ModelConfig) -> Dict[str, int]:
    """{"total", "non_embedding", "embedding"}; "embedding" includes an untied LM head.

    Counting the real module (rather than a formula) keeps the numbers true to the model as built.
    """
    with torch.device("meta"):
        model = MiniCPM(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied weights are yielded once
    embedding = model.embed_tokens.weight.numel()
    if model.lm_head is not None:
        embedding += model.lm_head.weight.numel()
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding}
