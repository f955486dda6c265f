"""DPO's reference log-probabilities: every row of a batch scored by a frozen model, through the
same engine and layout as the policy.

``score_rows`` is the one scoring path. Both reference modes use it: ``live`` scores each step's
batch with a frozen copy of the initial weights, and ``precompute`` scores every pair once before
the first step (the run directory keeps the table). So the two modes give the same numbers up to
the micro-batch composition's rounding.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megacpm.data.batch import Batch, shard_batch
from megacpm.objectives.dpo import sequence_logps
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.sharded_model import ShardedModel

# Axes whose ranks compute the same per-row values (the vocab-parallel loss is identical on every
# tensor-parallel rank): the world sum counts each value that many times.
SCORES_REPLICATED_OVER = ("tp",)


@torch.no_grad()
def score_rows(model: ShardedModel, ctx: ParallelContext, batch: Batch, micro_rows: int) -> torch.Tensor:
    """float64 [batch.num_rows] on the CPU, the same on every rank: each row's summed
    log-probability of its labels (0 for a row without labels).

    The batch is padded to fill dp * micro_rows rows, split over the data-parallel ranks as a
    training batch is, and run forward-only in micro-batches of ``micro_rows`` rows (a multiple
    of the objective's rows per sample, so a pair stays together); the last stage's ranks write
    their rows' scores and one all-reduce gives everyone the whole vector."""
    layout = ctx.layout
    per_round = layout.dp * micro_rows
    padded = batch.pad_rows(-(-batch.num_rows // per_round) * per_round)
    rows_per_rank = padded.num_rows // layout.dp
    first_row = ctx.dp_rank * rows_per_rank
    local = shard_batch(padded, ctx.dp_rank, layout.dp, ctx.coord("cp"), layout.cp)
    micro_batches = [m.to(ctx.device).contiguous() for m in local.split_rows(micro_rows)]
    scores = torch.zeros(padded.num_rows, dtype=torch.float64, device=ctx.device)

    def score(chunk, hidden, index):
        logps = sequence_logps(chunk, hidden, micro_batches[index].labels)
        start = first_row + index * micro_rows
        scores[start:start + logps.shape[0]] = logps.double()
        return logps.sum()

    model.forward_only(micro_batches, score)
    if ctx.world_size > 1:
        dist.all_reduce(scores)
        scores /= math.prod(layout.size(axis) for axis in SCORES_REPLICATED_OVER)
    return scores[:batch.num_rows].cpu()
