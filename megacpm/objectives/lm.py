"""Language modelling (pretraining): the token-weighted mean cross entropy of the step.

loss = sum over the step's loss tokens of -log p(label) / number of loss tokens in the global batch.

With ``position_buckets`` B (train.eval_position_buckets, for evaluation) it also reports the loss
by position: positions 0..seq_len cut into B equal buckets, and for each the mean loss of the loss
tokens whose input sits there, as ``loss_by_position/<first position of the bucket>``. The position
is the one the model sees (the token's position id: under data.document_mask the position within
its document), so the curve shows how the loss falls with the context a token has, the one that
says whether a model uses its context. The sums are per token, so they hold under any layout
(under context parallelism the position ids are global).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from megacpm.data.batch import IGNORE_INDEX, Batch
from megacpm.model import MiniCPM
from megacpm.objectives.base import Objective, Stats


def position_bucket_starts(buckets: int, seq_len: int) -> List[int]:
    """The first position of each of ``buckets`` equal buckets of positions 0..seq_len: bucket b
    holds the positions p with p * buckets // seq_len == b, so it starts at ceil(b * seq_len / buckets).
    The one home of the rule (the objective's buckets and tools/eval_long_context.py's)."""
    return [-(-b * seq_len // buckets) for b in range(buckets)]


class LanguageModelling(Objective):
    kind = "lm"
    stat_names: Tuple[str, ...] = ("loss_sum",)

    def __init__(self, position_buckets: int = 0, seq_len: int = 0):
        if position_buckets and not 0 < position_buckets <= seq_len:
            raise ValueError(f"train.eval_position_buckets: {position_buckets} buckets of a {seq_len}-token "
                             f"sequence (at most train.seq_len)")
        self.position_buckets, self.seq_len = position_buckets, seq_len
        self.bucket_starts = position_bucket_starts(position_buckets, seq_len) if position_buckets else []
        if position_buckets:
            self.stat_names = ("loss_sum", *(f"position_loss_sum/{s}" for s in self.bucket_starts),
                               *(f"position_tokens/{s}" for s in self.bucket_starts))

    def normaliser(self, batch: Batch) -> float:
        return float(max(batch.num_loss_tokens(), 1))  # an all-ignored batch has zero loss, not NaN

    def loss(self, chunk: MiniCPM, hidden: torch.Tensor, micro: Batch) -> Tuple[torch.Tensor, Stats]:
        if not self.position_buckets:
            loss_sum = chunk.head_loss(hidden, micro.labels, IGNORE_INDEX)
            return loss_sum, {"loss_sum": loss_sum.detach().float()}
        token_losses = chunk.head_loss(hidden, micro.labels, IGNORE_INDEX, reduction="none")
        loss_sum = token_losses.sum()
        return loss_sum, {"loss_sum": loss_sum.detach().float(), **self._by_position(token_losses.detach(), micro)}

    def _by_position(self, token_losses: torch.Tensor, micro: Batch) -> Stats:
        """The bucket sums of the loss and of the loss tokens, per bucket (fp32 scalars)."""
        positions = micro.position_ids
        if positions is None:
            positions = torch.arange(micro.seq_len, device=token_losses.device).expand_as(token_losses)
        starts = torch.tensor(self.bucket_starts, device=token_losses.device)
        # The last bucket starting at or before each position (a position past seq_len: the last).
        bucket = (torch.bucketize(positions.to(token_losses.device), starts, right=True) - 1).reshape(-1)
        counted = (micro.labels != IGNORE_INDEX).reshape(-1).float()
        sums = torch.zeros(self.position_buckets, device=token_losses.device).index_add_(
            0, bucket, token_losses.reshape(-1).float() * counted)
        tokens = torch.zeros(self.position_buckets, device=token_losses.device).index_add_(0, bucket, counted)
        stats = {f"position_loss_sum/{s}": sums[b] for b, s in enumerate(self.bucket_starts)}
        stats.update({f"position_tokens/{s}": tokens[b] for b, s in enumerate(self.bucket_starts)})
        return stats

    def metrics(self, stats: Dict[str, float], normaliser: float) -> Dict[str, float]:
        out = {"loss": stats["loss_sum"] / normaliser}
        for start in self.bucket_starts:
            tokens = stats[f"position_tokens/{start}"]
            if tokens > 0:  # a bucket no loss token reached (positions a short document never has)
                out[f"loss_by_position/{start}"] = stats[f"position_loss_sum/{start}"] / tokens
        return out
