"""Megatron-LM's GPT sample index, in numpy and (when built) in C++.

Documents are concatenated in ``doc_order`` into one token stream. Sample j covers stream positions
``j * seq_len .. j * seq_len + seq_len`` inclusive: seq_len + 1 tokens (the inputs plus the
next-token targets), so consecutive samples overlap by one token. The index has one row per sample
plus one: row j is (position in doc_order, offset within that document) of sample j's first token,
and the last row locates the last token of the last sample. There are
``(total_tokens - 1) // seq_len`` samples; a trailing partial sample is dropped.
"""
from __future__ import annotations

import numpy as np

try:  # the C++ extension is optional: numpy gives identical results, only slower.
    from megacpm import _C as _cpp
except ImportError:  # pragma: no cover - depends on whether the extension was built
    _cpp = None


def has_cpp_extension() -> bool:
    return _cpp is not None


def _as_inputs(doc_lengths, doc_order, seq_len: int):
    lengths = np.ascontiguousarray(doc_lengths, dtype=np.int32)
    order = np.ascontiguousarray(doc_order, dtype=np.int64)
    if lengths.ndim != 1 or order.ndim != 1:
        raise ValueError("build_sample_idx: doc_lengths and doc_order must be 1-D")
    if int(seq_len) < 1:
        raise ValueError(f"build_sample_idx: seq_len must be >= 1, got {seq_len}")
    if order.size and (order.min() < 0 or order.max() >= lengths.size):
        raise ValueError("build_sample_idx: doc_order holds an index that is not a document")
    if lengths.size and lengths.min() < 0:
        raise ValueError("build_sample_idx: negative document length")
    return lengths, order, int(seq_len)


def build_sample_idx_numpy(doc_lengths, doc_order, seq_len: int) -> np.ndarray:
    """Reference implementation: locate each sample's first stream position by binary search."""
    lengths, order, seq_len = _as_inputs(doc_lengths, doc_order, seq_len)
    # doc_starts[p]: stream position of the first token of the document at position p of doc_order.
    doc_starts = np.zeros(order.size + 1, dtype=np.int64)
    np.cumsum(lengths[order], dtype=np.int64, out=doc_starts[1:])
    total_tokens = int(doc_starts[-1])
    num_samples = max(total_tokens - 1, 0) // seq_len
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    # side="right" picks the last document starting at or before the position, which skips
    # empty documents (they share their start with the next one).
    doc_pos = np.searchsorted(doc_starts, starts, side="right") - 1
    if num_samples == 0:  # no sample: one row pointing at the start, like the C++ version
        doc_pos = np.zeros(1, dtype=np.int64)
    sample_idx = np.empty((num_samples + 1, 2), dtype=np.int64)
    sample_idx[:, 0] = doc_pos
    sample_idx[:, 1] = starts - doc_starts[doc_pos]
    return sample_idx


def build_sample_idx(doc_lengths, doc_order, seq_len: int) -> np.ndarray:
    """int64 [num_samples + 1, 2]; the C++ extension when it imports, numpy otherwise."""
    if _cpp is None:
        return build_sample_idx_numpy(doc_lengths, doc_order, seq_len)
    lengths, order, seq_len = _as_inputs(doc_lengths, doc_order, seq_len)
    return _cpp.build_sample_idx(lengths, order, seq_len)
