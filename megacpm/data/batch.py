"""The batch every dataset collates into, and the one function that takes this rank's share of it.

A ``Batch`` holds model inputs and their targets, already aligned: ``labels[b, t]`` is the token to
predict after ``input_ids[b, t]``, ``IGNORE_INDEX`` where no loss is taken (a prompt under SFT, the
padding of an evaluation batch). The shift from a stream of tokens into (inputs, labels) is made
once, here (``Batch.from_tokens``), never by the model or the trainer.

Optional fields, None when unused:
- ``position_ids`` [B, S]: the RoPE position of each token (packed documents restart at 0; under
  context parallelism a rank's tokens are not a contiguous range).
- ``document_ids`` [B, S]: which packed document each token belongs to; attention stays inside a
  document (a document mask).
- ``extras``: per-sample tensors [B, ...] that travel with their rows, e.g. the pair id of a
  preference sample.

Every tensor is row-aligned, so splitting by rows (data parallelism, micro-batches) splits them all
alike; ``shard_batch`` also splits the sequence dimension for context parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable, Dict, List, Optional

import torch

IGNORE_INDEX = -100  # labels without a loss (torch.nn.functional.cross_entropy's default)


@dataclass
class Batch:
    input_ids: torch.Tensor  # int64 [B, S]
    labels: torch.Tensor  # int64 [B, S], IGNORE_INDEX where no loss is taken
    position_ids: Optional[torch.Tensor] = None  # int64 [B, S]
    document_ids: Optional[torch.Tensor] = None  # int [B, S]
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)  # each [B, ...]

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2:
            raise ValueError(f"Batch.input_ids must be [batch, seq], got shape {tuple(self.input_ids.shape)}")
        for name in ("labels", "position_ids", "document_ids"):
            value = getattr(self, name)
            if value is not None and value.shape != self.input_ids.shape:
                raise ValueError(f"Batch.{name} has shape {tuple(value.shape)}, input_ids "
                                 f"{tuple(self.input_ids.shape)}")
        for name, value in self.extras.items():
            if value.shape[0] != self.num_rows:
                raise ValueError(f"Batch.extras[{name!r}] has {value.shape[0]} rows, the batch {self.num_rows}")

    @classmethod
    def from_tokens(cls, windows: torch.Tensor) -> "Batch":
        """The language-modelling batch of token windows [B, S + 1]: inputs are the first S tokens,
        labels the last S (each position predicts the next token)."""
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise ValueError(f"token windows must be [batch, seq + 1] with seq >= 1, got {tuple(windows.shape)}")
        return cls(input_ids=windows[:, :-1], labels=windows[:, 1:])

    def with_document_mask(self, eod_id: int) -> "Batch":
        """The batch with its documents separated (data.document_mask): each end-of-document token in
        input_ids closes a document, positions restart after it and attention stays inside each."""
        is_eod = (self.input_ids == eod_id).long()
        documents = torch.cumsum(is_eod, dim=1) - is_eod  # the end token belongs to the document it ends
        index = torch.arange(self.seq_len, device=self.input_ids.device).expand_as(self.input_ids)
        starts_here = torch.zeros_like(is_eod, dtype=torch.bool)
        starts_here[:, 0] = True
        starts_here[:, 1:] = is_eod[:, :-1].bool()
        first = torch.cummax(torch.where(starts_here, index, torch.zeros_like(index)), dim=1).values
        return replace(self, position_ids=index - first, document_ids=documents)

    # -- shape -----------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def num_loss_tokens(self) -> int:
        """Tokens that carry a loss (labels != IGNORE_INDEX)."""
        return int((self.labels != IGNORE_INDEX).sum())

    # -- transforms (each returns a new Batch) ----------------------------------------------------
    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], seq_fn: Optional[Callable] = None) -> "Batch":
        """fn applied to every row-aligned tensor (``seq_fn``, default fn, to the [B, S] ones)."""
        seq_fn = seq_fn or fn
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extras":
                values["extras"] = {k: fn(v) for k, v in value.items()}
            else:
                values[f.name] = None if value is None else seq_fn(value)
        return Batch(**values)

    def rows(self, start: int, end: int) -> "Batch":
        return self.map(lambda t: t[start:end])

    def split_rows(self, rows_per_part: int) -> List["Batch"]:
        """Consecutive parts of ``rows_per_part`` rows (the last may be shorter): micro-batches."""
        return [self.rows(start, min(start + rows_per_part, self.num_rows))
                for start in range(0, self.num_rows, rows_per_part)]

    def to(self, device: torch.device) -> "Batch":
        return self.map(lambda t: t.to(device, non_blocking=True))

    def contiguous(self) -> "Batch":
        return self.map(lambda t: t.contiguous())

    def pad_rows(self, num_rows: int) -> "Batch":
        """The batch padded to ``num_rows`` rows with copies of row 0 whose labels are all ignored:
        padding that changes no loss and no count."""
        extra = num_rows - self.num_rows
        if extra < 0:
            raise ValueError(f"cannot pad a batch of {self.num_rows} rows to {num_rows}")
        if extra == 0:
            return self
        padded = self.map(lambda t: torch.cat([t, t[:1].expand(extra, *t.shape[1:])]))
        labels = padded.labels.clone()
        labels[self.num_rows:] = IGNORE_INDEX
        return replace(padded, labels=labels)


def shard_batch(batch: Batch, dp_rank: int, dp_size: int, cp_rank: int = 0, cp_size: int = 1) -> Batch:
    """This rank's share of a global batch: rows ``dp_rank`` of ``dp_size`` equal parts (data
    parallelism), and of each row the sequence part of context-parallel rank ``cp_rank`` — with
    cp_size > 1 the sequence is cut into 2 * cp_size chunks and rank r keeps chunks r and
    2 * cp_size - 1 - r (causal attention's work balanced over the ranks), with the global
    positions kept in position_ids."""
    if batch.num_rows % dp_size:
        raise ValueError(f"a batch of {batch.num_rows} rows does not split over {dp_size} data-parallel ranks")
    per_rank = batch.num_rows // dp_size
    mine = batch.rows(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    if cp_size == 1:
        return mine
    if batch.seq_len % (2 * cp_size):
        raise ValueError(f"train.seq_len {batch.seq_len} does not split into 2 * cp = {2 * cp_size} chunks")
    if mine.position_ids is None:
        positions = torch.arange(batch.seq_len, device=batch.input_ids.device).expand(per_rank, -1)
        mine = replace(mine, position_ids=positions)
    keep = context_parallel_index(cp_rank, cp_size, batch.seq_len, batch.input_ids.device)
    return mine.map(lambda t: t, seq_fn=lambda t: t.index_select(1, keep))


def head_tail_chunks(cp_rank: int, cp_size: int) -> tuple:
    """The two of a sequence's 2 * cp_size chunks that context-parallel rank ``cp_rank`` holds:
    (cp_rank, 2 * cp_size - 1 - cp_rank), an early and a late one, so every rank has the same
    causal-attention work. The one home of the split."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def context_parallel_index(cp_rank: int, cp_size: int, seq_len: int, device=None) -> torch.Tensor:
    """int64 [seq_len / cp_size]: the sequence positions rank ``cp_rank``'s tokens hold, in its order."""
    chunk = seq_len // (2 * cp_size)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device)
                      for c in head_tail_chunks(cp_rank, cp_size)])
