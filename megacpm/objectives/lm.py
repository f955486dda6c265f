"""Language modelling (pretraining): the token-weighted mean cross entropy of the step.

loss = sum over the step's loss tokens of -log p(label) / number of loss tokens in the global batch.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from megacpm.data.batch import IGNORE_INDEX, Batch
from megacpm.model import MiniCPM
from megacpm.objectives.base import Objective, Stats


class LanguageModelling(Objective):
    kind = "lm"
    stat_names = ("loss_sum",)

    def normaliser(self, batch: Batch) -> float:
        return float(max(batch.num_loss_tokens(), 1))  # an all-ignored batch has zero loss, not NaN

    def loss(self, chunk: MiniCPM, hidden: torch.Tensor, micro: Batch) -> Tuple[torch.Tensor, Stats]:
        loss_sum = chunk.head_loss(hidden, micro.labels, IGNORE_INDEX)
        return loss_sum, {"loss_sum": loss_sum.detach().float()}

    def metrics(self, stats: Dict[str, float], normaliser: float) -> Dict[str, float]:
        return {"loss": stats["loss_sum"] / normaliser}
