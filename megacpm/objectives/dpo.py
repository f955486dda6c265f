"""Direct preference optimisation (Rafailov et al., 2023) with TRL's metrics.

A batch holds pairs as adjacent rows: row 2i is pair i's chosen sequence, row 2i + 1 its rejected
one, in the same micro-batch on the same rank (``rows_per_sample`` 2). Each row's labels cover its
completion only, so a row's log-probability is minus its summed token loss (per token, from the
fused linear cross entropy with reduction "none": no full logits). The reference model's
log-probabilities of the same rows arrive with the batch as ``extras["reference_logps"]``
(precomputed or live; megacpm.train.reference).

With h = (pc - rc) - (pr - rr) (policy minus reference, chosen minus rejected):
- sigmoid: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h), e = label_smoothing;
- ipo: (h - 1 / (2 beta))^2 (on the summed log-probabilities, as the IPO paper writes it; TRL
  length-normalises them);
- hinge: relu(1 - beta h).
Under context parallelism a row's log-probability and its completion-token count are completed
over the cp ranks (``sequence_sum``); the reference's arrive whole (megacpm.train.reference sums
the ranks' parts). The step's loss is the mean over the global batch's pairs; a pair without
completion tokens (the padding of an evaluation batch) counts for nothing. Rewards are beta times
the policy-minus-reference log-probability; accuracies count pairs whose chosen reward is above
the rejected one.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from megacpm.data.batch import IGNORE_INDEX, Batch
from megacpm.model import MiniCPM
from megacpm.objectives.base import Objective, Stats

REFERENCE_LOGPS = "reference_logps"  # Batch.extras key: float [rows], the reference model's log-probabilities


def pair_losses(margin: torch.Tensor, beta: float, loss: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss of h = (pc - rc) - (pr - rr)."""
    if loss == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    if loss == "ipo":
        return (margin - 1.0 / (2.0 * beta)) ** 2
    if loss == "hinge":
        return torch.relu(1.0 - beta * margin)
    raise ValueError(f"objective.loss: must be sigmoid, ipo or hinge, got {loss!r}")


def sequence_logps(chunk: MiniCPM, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 [rows]: each row's summed log-probability of its labels (IGNORE_INDEX tokens count 0)."""
    return -chunk.head_loss(hidden, labels, IGNORE_INDEX, reduction="none").sum(dim=1)


def has_completion(batch: Batch) -> torch.Tensor:
    """bool [pairs]: the pairs whose chosen row has a completion token."""
    return (batch.labels[0::2] != IGNORE_INDEX).any(dim=1)


class DirectPreferenceOptimization(Objective):
    kind = "dpo"
    rows_per_sample = 2
    whole_sequence = True
    stat_names = ("loss_sum", "pairs", "chosen_rewards", "rejected_rewards", "accuracies", "margins",
                  "chosen_logps", "rejected_logps")

    def __init__(self, beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0):
        self.beta, self.loss_type, self.label_smoothing = float(beta), loss, float(label_smoothing)

    def normaliser(self, batch: Batch) -> float:
        return float(max(int(has_completion(batch).sum()), 1))

    def loss(self, chunk: MiniCPM, hidden: torch.Tensor, micro: Batch) -> Tuple[torch.Tensor, Stats]:
        if REFERENCE_LOGPS not in micro.extras:
            raise RuntimeError("DPO needs the reference log-probabilities of every row (batch.extras"
                               f"[{REFERENCE_LOGPS!r}]); the trainer attaches them")
        policy = self.sequence_sum(sequence_logps(chunk, hidden, micro.labels))
        reference = micro.extras[REFERENCE_LOGPS].to(policy.dtype)
        completion_tokens = (micro.labels[0::2] != IGNORE_INDEX).sum(dim=1).to(policy.dtype)
        valid = (self.sequence_sum(completion_tokens) > 0).to(policy.dtype)  # has_completion of the whole rows
        chosen_logps, rejected_logps = policy[0::2], policy[1::2]
        chosen_ratio = chosen_logps - reference[0::2]
        rejected_ratio = rejected_logps - reference[1::2]
        losses = pair_losses(chosen_ratio - rejected_ratio, self.beta, self.loss_type, self.label_smoothing)
        loss_sum = (losses * valid).sum()
        with torch.no_grad():
            chosen_rewards = self.beta * chosen_ratio.detach()
            rejected_rewards = self.beta * rejected_ratio.detach()
            stats = {
                "loss_sum": loss_sum.detach(),
                "pairs": valid.sum(),
                "chosen_rewards": (chosen_rewards * valid).sum(),
                "rejected_rewards": (rejected_rewards * valid).sum(),
                "accuracies": ((chosen_rewards > rejected_rewards).to(valid.dtype) * valid).sum(),
                "margins": ((chosen_rewards - rejected_rewards) * valid).sum(),
                "chosen_logps": (chosen_logps.detach() * valid).sum(),
                "rejected_logps": (rejected_logps.detach() * valid).sum(),
            }
        return loss_sum, stats

    def metrics(self, stats: Dict[str, float], normaliser: float) -> Dict[str, float]:
        pairs = max(stats["pairs"], 1.0)
        return {
            "loss": stats["loss_sum"] / normaliser,
            "rewards/chosen": stats["chosen_rewards"] / pairs,
            "rewards/rejected": stats["rejected_rewards"] / pairs,
            "rewards/accuracies": stats["accuracies"] / pairs,
            "rewards/margins": stats["margins"] / pairs,
            "logps/chosen": stats["chosen_logps"] / pairs,
            "logps/rejected": stats["rejected_logps"] / pairs,
        }
