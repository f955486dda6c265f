"""DPO's reference log-probabilities: every row of a batch scored by a frozen model, through the
same engine and layout as the policy.

``score_rows`` is the one scoring path. Both reference modes use it: ``live`` scores each step's
batch with a frozen copy of the initial weights, and ``precompute`` scores every pair once before
the first step (the run directory keeps the table). So the two modes give the same numbers up to
the micro-batch composition's rounding.
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megacpm.checkpoint.init_from import InitSource, load_initial_weights
from megacpm.config import Config
from megacpm.data.batch import Batch, shard_batch
from megacpm.data.chat import SAMPLE_INDEX
from megacpm.io import atomic
from megacpm.objectives.dpo import REFERENCE_LOGPS, sequence_logps
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.sharded_model import ShardedModel

# Axes whose ranks compute the same per-row values (the vocab-parallel loss is identical on every
# tensor-parallel rank): the world sum counts each value that many times. Context-parallel ranks
# hold parts of a row, not copies: the world sum adds their parts into the row's whole.
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


# -- the two reference modes -------------------------------------------------------------------
def reference_model(cfg: Config, ctx: ParallelContext, param_dtype: torch.dtype,
                    source: Optional[InitSource]) -> ShardedModel:
    """A frozen copy of the run's initial weights on this layout: train.init_from's, or (without
    it) the seeded initialisation every rank builds the policy from."""
    model = ShardedModel(cfg.model, ctx, sequence_parallel=cfg.parallel.sp,
                         generator=torch.Generator().manual_seed(cfg.train.seed), param_dtype=param_dtype,
                         context_parallel_attention=cfg.parallel.cp_attention)
    if source is not None:
        load_initial_weights(source, cfg.model, model)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _with_reference(batch: Batch, logps: torch.Tensor) -> Batch:
    return replace(batch, extras={**batch.extras, REFERENCE_LOGPS: logps.to(torch.float64)})


class LiveReference:
    """``objective.reference: live``: each batch scored by a frozen model as it comes."""

    def __init__(self, model: ShardedModel, ctx: ParallelContext, micro_rows: int):
        self.model, self.ctx, self.micro_rows = model, ctx, micro_rows

    def attach(self, batch: Batch, split: str) -> Batch:
        return _with_reference(batch, score_rows(self.model, self.ctx, batch, self.micro_rows))


class PrecomputedReference:
    """``objective.reference: precompute``: every pair's scores looked up by its sample index."""

    def __init__(self, tables: Dict[str, np.ndarray]):
        self.tables = tables  # split -> float64 [pairs, 2] (chosen, rejected)

    def attach(self, batch: Batch, split: str) -> Batch:
        units = batch.extras[SAMPLE_INDEX].numpy()
        side = np.arange(batch.num_rows) % 2  # rows alternate chosen, rejected
        return _with_reference(batch, torch.from_numpy(self.tables[split][units, side]))


def score_split(model: ShardedModel, ctx: ParallelContext, dataset, micro_rows: int, units_per_call: int
                ) -> np.ndarray:
    """float64 [units, rows per unit]: every unit of a split scored, ``units_per_call`` at a time."""
    scores = np.zeros((dataset.num_samples, dataset.rows_per_sample), dtype=np.float64)
    for start in range(0, dataset.num_samples, units_per_call):
        units = range(start, min(start + units_per_call, dataset.num_samples))
        scores[start:units.stop] = score_rows(model, ctx, dataset.batch_of(units), micro_rows).view(
            len(units), dataset.rows_per_sample).numpy()
    return scores


def reference_identity(cfg: Config, data_signature: str, init: str) -> Dict[str, object]:
    """What a precomputed table depends on: checked before a resumed run uses one."""
    return {"version": 1, "data": data_signature, "init": init, "model": asdict(cfg.model)}


def save_reference_table(path: Path, tables: Dict[str, np.ndarray], identity: Dict[str, object]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, identity=np.frombuffer(json.dumps(identity, sort_keys=True).encode("utf-8"), dtype=np.uint8),
             **tables)
    atomic.write_bytes_atomic(path, buffer.getvalue())


def load_reference_table(path: Path) -> Optional[Tuple[Dict[str, np.ndarray], Dict[str, object]]]:
    """(tables, identity) of a saved table, None when there is none or it cannot be read (it is
    rebuilt then: a table is derived data)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            identity = json.loads(saved["identity"].tobytes().decode("utf-8"))
            return {name: saved[name] for name in saved.files if name != "identity"}, identity
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # missing, truncated, not ours
        return None
