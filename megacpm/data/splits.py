"""The held-out splits: which documents (or chat samples) are validation and test.

A fixed, seed-independent choice: changing train.seed never moves a document between splits.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from megacpm.data.errors import DataError

# Seeds the choice of held-out documents. A constant on purpose: see the module doc.
VALIDATION_SPLIT_SEED = 20240401


def held_out_doc_ids(doc_lengths: np.ndarray, val_fraction: float, test_fraction: float = 0.0
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted ids of the validation documents (round(val_fraction * num_docs), at least 1) and of the
    test documents (round(test_fraction * num_docs)); the rest train.

    They are drawn in a fixed pseudo-random order, validation first, but a document holding more than
    val_fraction of all tokens comes last in that order: one such document alone would exceed the
    intended share (the embedded corpus' pydoc topics, 8% of its tokens, would turn a 2% split into
    10% and take the only English prose out of training). It is held out only when too few others
    exist. Adding a test split never changes the validation documents.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
    num_docs = len(doc_lengths)
    num_valid = min(max(1, round(val_fraction * num_docs)), num_docs - 1)
    num_test = min(round(test_fraction * num_docs), num_docs - 1 - num_valid)
    rng = np.random.Generator(np.random.PCG64(VALIDATION_SPLIT_SEED))
    order = rng.permutation(num_docs)
    oversized = doc_lengths[order] > val_fraction * doc_lengths.sum()
    ranked = np.concatenate([order[~oversized], order[oversized]])
    return np.sort(ranked[:num_valid]), np.sort(ranked[num_valid:num_valid + num_test])


def validation_doc_ids(doc_lengths: np.ndarray, val_fraction: float) -> np.ndarray:
    return held_out_doc_ids(doc_lengths, val_fraction)[0]
