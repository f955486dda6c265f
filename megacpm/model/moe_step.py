"""What a training step's MoE layers share: each micro-batch's weight in the auxiliary losses, and
the routing statistics the layers record.

The step's auxiliary loss is

    aux = sum over layers l and micro-batches b of  w_b * (c_aux * LB_l(b) + c_z * Z_l(b)),
    w_b = tokens of b / tokens of the global batch,

LB_l(b) the Switch load-balancing loss of layer l over micro-batch b's tokens and Z_l(b) the router
z-loss: a token-weighted mean over the global batch, so it is the same number whatever the
micro-batches, data-parallel ranks and pipeline stages (each micro-batch is routed whole on one
rank; expert parallelism moves only the expert computation). Each layer attaches its term to its
output (megacpm.model.moe.attach_aux_loss), so the gradient reaches the router on the stage that
holds it and nothing travels with the activations. ``grad_share`` divides that gradient among
ranks that route the same tokens and whose router gradients are summed (the tensor-parallel ranks).

Under context parallelism a micro-batch's tokens are split over the cp ranks (each holds the same
number). LB_l(b) needs the load over all of them: ``sum_over_sequence`` (an all-reduce over the cp
group, injected by the train module) completes the assignment counts before the loss is taken, and
each rank's LB and Z over its own tokens, weighted by its own token share, sum over the cp ranks to
the micro-batch's (the mean of equal-sized parts' means is the whole's mean), in the loss, its
gradient (summed over dp x cp like every dense gradient) and the recorded statistics.

The step object is passed to the model's forward as an argument, never kept in a module: a
forward without one (evaluation, scoring) adds no auxiliary loss and records nothing.

Statistics are written, not accumulated, per (micro-batch, layer): activation checkpointing runs
a block's forward again in the backward, and its second record must not count twice.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from megacpm.model.moe import attach_aux_loss, load_balancing_loss, z_loss

# Columns of a layer's record after its E expert counts.
AUX, Z, DROPPED = 0, 1, 2
EXTRA = 3


def _whole(counts: torch.Tensor) -> torch.Tensor:
    return counts


class MoEStep:
    """The MoE bookkeeping of one step (or of one forward: ``micro_tokens`` of its micro-batches)."""

    def __init__(self, num_layers: int, num_experts: int, micro_tokens: Sequence[int], global_tokens: int,
                 aux_coeff: float, z_coeff: float, grad_share: int = 1, device: Optional[torch.device] = None,
                 sum_over_sequence: Callable[[torch.Tensor], torch.Tensor] = _whole):
        if global_tokens <= 0:
            raise ValueError(f"a step of {global_tokens} tokens")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.weights = [tokens / global_tokens for tokens in micro_tokens]
        self.aux_coeff, self.z_coeff, self.grad_share = aux_coeff, z_coeff, grad_share
        self.sum_over_sequence = sum_over_sequence
        self.records = torch.zeros(len(micro_tokens), num_layers, num_experts + EXTRA, dtype=torch.float32,
                                   device=device)

    def micro(self, index: int) -> "MicroBatchMoE":
        return MicroBatchMoE(self, index)

    def totals(self) -> torch.Tensor:
        """[layers, E + 3]: this rank's records summed over its micro-batches (per layer: the
        assignments per expert, the weighted LB and z sums, the dropped assignments)."""
        return self.records.sum(0)

    @staticmethod
    def metrics(totals: torch.Tensor, layer_ids: Sequence[int]) -> Dict[str, float]:
        """The step's MoE metrics from ``totals`` summed over all ranks: the load-balancing and z
        losses (mean over layers; LB is 1 at perfect balance), each layer's max / mean expert load
        and the worst layer's, and the fraction of assignments dropped by the capacity."""
        num_experts = totals.shape[1] - EXTRA
        counts = totals[:, :num_experts]
        assignments = counts.sum(1).clamp_min(1.0)
        load = counts / assignments[:, None]
        out = {"moe/aux_loss": float(totals[:, num_experts + AUX].mean()),
               "moe/z_loss": float(totals[:, num_experts + Z].mean()),
               "moe/dropped_fraction": float(totals[:, num_experts + DROPPED].sum() / assignments.sum())}
        max_load = load.max(1).values * num_experts
        out["moe/max_load"] = float(max_load.max())
        for row, layer in enumerate(layer_ids):
            out[f"moe/max_load/{layer}"] = float(max_load[row])
        return out


class MicroBatchMoE:
    """One micro-batch's view of the step: what a layer calls while the micro-batch runs."""

    def __init__(self, step: MoEStep, index: int):
        self.step, self.index = step, index

    def attach(self, layer: int, output: torch.Tensor, routing, keep: torch.Tensor) -> torch.Tensor:
        """``output`` of MoE layer ``layer`` with this micro-batch's auxiliary-loss term attached,
        and the layer's routing statistics recorded."""
        step = self.step
        weight = step.weights[self.index]
        with torch.no_grad():
            counts = torch.bincount(routing.experts.reshape(-1), minlength=step.num_experts).float()
            sequence_counts = step.sum_over_sequence(counts)
            load = sequence_counts / sequence_counts.sum().clamp_min(1.0)
        balance = load_balancing_loss(routing, step.num_experts, load=load)
        zl = z_loss(routing)  # computed for the metrics also when its coefficient is 0
        loss = step.aux_coeff * balance + step.z_coeff * zl
        with torch.no_grad():
            extra = torch.stack([balance.detach() * weight, zl.detach() * weight, (~keep).sum().float()])
            step.records[self.index, layer] = torch.cat([counts, extra])
        if not (step.aux_coeff or step.z_coeff):
            return output
        return attach_aux_loss(output, loss, weight / step.grad_share)
