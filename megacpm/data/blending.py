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
