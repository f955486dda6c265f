"""The order in which a data mixture takes its samples, in numpy and (when built) in C++.

The quota method of Balinski and Young (1975): sample n (a "house" of n + 1 seats) goes, among the
datasets still below their share ``weights[i] * (n + 1)``, to the one with the largest
``weights[i] / (taken[i] + 1)`` (the first on ties), and is that dataset's next sample. After every
prefix of length n each dataset has taken floor or ceil of ``weights[i] * n`` samples: the mixture
is exact at every step to within one sample, not only on average (Megatron-LM's greedy
largest-deficit rule can drift past one sample with many datasets). A prefix's choices never depend
on how many samples are built, so the order does not depend on train.steps.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

try:  # the C++ extension is optional: numpy gives identical results, only slower.
    from megacpm import _C as _cpp
except ImportError:  # pragma: no cover - depends on whether the extension was built
    _cpp = None


def has_cpp_blending() -> bool:
    return _cpp is not None and hasattr(_cpp, "build_blending_indices")


def normalized_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size < 1 or w.size > 32767:
        raise ValueError("blending weights must be a list of 1 to 32767 numbers")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blending weights must be non-negative with a positive sum, got {list(weights)}")
    return w / w.sum()


def build_blending_indices_numpy(weights: Sequence[float], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Reference implementation (a Python loop over samples, vectorised over datasets)."""
    w = normalized_weights(weights)
    if size < 0:
        raise ValueError("build_blending_indices: size must be >= 0")
    taken = np.zeros(w.size, dtype=np.int64)
    dataset_index = np.empty(size, dtype=np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    for n in range(size):
        eligible = taken < w * (n + 1)  # below the upper quota
        priority = np.where(eligible, w / (taken + 1), -1.0)
        best = int(np.argmax(priority))  # argmax returns the first maximum
        dataset_index[n] = best
        dataset_sample_index[n] = taken[best]
        taken[best] += 1
    return dataset_index, dataset_sample_index


def build_blending_indices(weights: Sequence[float], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(int16 dataset of each sample, int64 sample within that dataset); C++ when it imports."""
    if not has_cpp_blending():
        return build_blending_indices_numpy(weights, size)
    if size < 0:
        raise ValueError("build_blending_indices: size must be >= 0")
    return _cpp.build_blending_indices(normalized_weights(weights), int(size))


class BlendedDataset:
    """A mixture of sample streams: sample i is sample ``dataset_sample_index[i]`` of dataset
    ``dataset_index[i]`` (the quota order above), for any i >= 0. The order is built on demand,
    doubling, which the order's prefix stability makes invisible."""

    def __init__(self, datasets: Sequence, weights: Sequence[float]):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("BlendedDataset: one weight per dataset, at least one dataset")
        self.datasets = list(datasets)
        self.weights = normalized_weights(weights)
        self.seq_len = self.datasets[0].seq_len
        self._built = 0
        self._order: Tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int16), np.zeros(0, np.int64))

    def __len__(self) -> int:
        """Samples of one pass over the smallest share (the stream itself is infinite)."""
        return int(min(len(d) / w for d, w in zip(self.datasets, self.weights) if w > 0))

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        if i >= self._built:
            self._built = max(i + 1, 2 * self._built, 4096)
            self._order = build_blending_indices(self.weights, self._built)
        return self.datasets[int(self._order[0][i])][int(self._order[1][i])]

