"""The Objective contract: what a training step minimises, and what it reports.

An objective turns the last pipeline chunk's hidden states of one micro-batch into a summed loss
and a few summed statistics; the train module divides that loss by the objective's normaliser of
the whole global batch (the same number on every rank) before back-propagating. So whatever the
layout — micro-batches, data-parallel replicas, pipeline stages, tensor-parallel ranks — the sum of
the gradients is the gradient of one function: sum of losses / global normaliser (TRL's
num_items_in_batch), not a mean of per-rank means. That is why the gradient buffers sum over
replicas instead of averaging (megacpm.optim.sharded_optimizer).

Statistics are sums, so they reduce exactly: the train module sums them over micro-batches and
ranks (each value is held by the last stage's tensor-parallel ranks, identically) and hands the
totals to ``metrics``, whose keys reach every metrics sink ("loss" is required).

Under context parallelism each rank holds part of every sequence. A token-level objective (LM,
SFT) needs nothing: its sums are sums over tokens. A sequence-level one (DPO: a function of each
row's summed log-probability) completes its per-row sums with ``sequence_sum`` (injected by the
train module: forward all-reduce over the cp group, backward identity; the identity in one
process) and sets ``whole_sequence``: every cp rank then computes the same loss and statistics, and
the step's reduction counts them once.

A new objective (SFT, DPO) is a subclass in megacpm/objectives/ registered in OBJECTIVES
(megacpm/objectives/__init__.py) under its ``objective.kind``.
"""
from __future__ import annotations

import abc
from typing import Callable, Dict, Tuple

import torch

from megacpm.data.batch import Batch
from megacpm.model import MiniCPM

Stats = Dict[str, torch.Tensor]


def _whole(per_row: torch.Tensor) -> torch.Tensor:
    return per_row


class Objective(abc.ABC):
    """Subclasses implement ``normaliser``, ``loss`` and ``metrics`` (abstract here)."""

    kind = "base"
    stat_names: Tuple[str, ...] = ()  # the keys of the statistics ``loss`` returns, in a fixed order
    # Batch rows per sample: the batch sizes count samples, and a sample's rows always share a
    # micro-batch and a rank (DPO's pair: 2).
    rows_per_sample = 1
    # True when the loss is a function of whole sequences (see the module docstring).
    whole_sequence = False
    # Per-row sums over this rank's tokens -> over the whole sequences (the train module's cp sum).
    sequence_sum: Callable[[torch.Tensor], torch.Tensor] = staticmethod(_whole)

    @abc.abstractmethod
    def normaliser(self, batch: Batch) -> float:
        """The positive divisor of the step's summed loss, from the global batch."""

    @abc.abstractmethod
    def loss(self, chunk: MiniCPM, hidden: torch.Tensor, micro: Batch) -> Tuple[torch.Tensor, Stats]:
        """(summed loss of the micro-batch as a differentiable scalar, {name: summed statistic as a
        detached scalar} for every name of ``stat_names``) from the last chunk and its output
        ``hidden`` [micro, seq, hidden]."""

    @abc.abstractmethod
    def metrics(self, stats: Dict[str, float], normaliser: float) -> Dict[str, float]:
        """The step's metrics from the global sums of the statistics; must include "loss"."""
