"""The optimal batch size for a loss, from runs that differ only in their batch size.

MiniCPM (section 4.2) trains the same model at several batch sizes and, for each loss level,
counts the tokens each batch size needs to reach it: the batch size with the fewest tokens is
optimal for that loss. Smaller losses need larger batches, and the pairs (loss, optimal batch)
follow bs = a / L**b (megacpm.scaling.laws.fit_batch_size_law).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from megacpm.scaling.optimum import interpolated_minimum

Curve = Tuple[Sequence[float], Sequence[float]]  # (tokens consumed, training loss), in step order


def smooth(tokens: Sequence[float], loss: Sequence[float], window_tokens: float) -> np.ndarray:
    """Trailing mean of the loss over the last ``window_tokens`` tokens at each point.

    The same window in tokens for every batch size: a small batch's noisy per-step loss is
    averaged over more steps, and every curve lags by the same number of tokens.
    """
    tokens, loss = np.asarray(tokens, dtype=float), np.asarray(loss, dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(loss)])
    start = np.searchsorted(tokens, tokens - window_tokens, side="right")
    ends = np.arange(1, len(loss) + 1)
    return (cumulative[ends] - cumulative[start]) / (ends - start)


def tokens_to_reach(tokens: Sequence[float], loss: Sequence[float], level: float) -> Optional[float]:
    """Tokens at which the (smoothed) curve first gets down to ``level``, interpolated linearly;
    None if it never does."""
    tokens, loss = np.asarray(tokens, dtype=float), np.asarray(loss, dtype=float)
    below = np.nonzero(loss <= level)[0]
    if len(below) == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(tokens[0])
    t0, t1, l0, l1 = tokens[i - 1], tokens[i], loss[i - 1], loss[i]
    return float(t0 + (t1 - t0) * (l0 - level) / (l0 - l1))


@dataclass(frozen=True)
class OptimalBatch:
    loss: float  # the loss level
    batch_tokens: float  # the batch size (tokens) that reaches it in the fewest tokens
    tokens: float  # how many tokens that takes
    edge: bool  # the optimum is the smallest or the largest batch tried: only a bound


def optimal_batch_sizes(curves: Mapping[int, Curve], levels: Sequence[float],
                        window_tokens: Optional[float] = None) -> list:
    """For each loss level reached by at least three batch sizes, the optimal batch size.

    ``curves`` maps a batch size in tokens to its run's (tokens, loss). Between grid points the
    optimum is refined with a parabola through the best batch size and its two neighbours in
    (log batch, log tokens), the shape of the paper's curves near their minimum.
    """
    batches = sorted(curves)
    if len(batches) < 3:
        raise ValueError(f"need runs at 3 or more batch sizes, got {len(batches)}")
    window = window_tokens if window_tokens is not None else 4 * batches[-1]
    smoothed = {b: (np.asarray(curves[b][0], dtype=float), smooth(*curves[b], window)) for b in batches}
    found = []
    for level in levels:
        needed = [(b, tokens_to_reach(*smoothed[b], level)) for b in batches]
        reached = [(b, t) for b, t in needed if t is not None]
        if len(reached) < 3:
            continue
        best = min(range(len(reached)), key=lambda i: reached[i][1])
        edge = best in (0, len(reached) - 1)
        batch, tokens = reached[best]
        refined = interpolated_minimum([b for b, _ in reached], [math.log(t) for _, t in reached])
        found.append(OptimalBatch(float(level), float(refined or batch), float(tokens), edge))
    return found
