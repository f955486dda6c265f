"""GPT pre-training samples: an infinite, seeded stream of seq_len + 1 token windows.

The documents of one split are concatenated, each followed by the end-of-document token. Epoch e
orders the documents by a random permutation, cuts the stream into samples (see sample_index) and
visits them in a random order; both permutations come from a PCG64 generator seeded with
(seed, e, split). Sample i of the stream therefore depends only on (data, seq_len, seed, i) and
never on the number of training steps, the batch size or how often the run was resumed.
"""
from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from megacpm.data.cache import cache_key, save_npy_atomic
from megacpm.data.sample_index import build_sample_idx


@dataclass(frozen=True)
class EpochIndex:
    epoch: int
    doc_order: np.ndarray  # int64 [num_docs]: document ids in stream order
    sample_idx: np.ndarray  # int64 [samples_per_epoch + 1, 2]: see sample_index
    sample_order: np.ndarray  # int64 [samples_per_epoch]: sample visited at each step of the epoch


class GPTSampleDataset:
    """``ds[i]``: np.int64 array of seq_len + 1 tokens, for any i >= 0 (epoch = i // len(ds))."""

    def __init__(
        self,
        tokens: np.ndarray,
        doc_offsets: np.ndarray,
        *,
        seq_len: int,
        seed: int,
        eod_id: int,
        split: str,
    ) -> None:
        """tokens: the split's documents back to back; doc_offsets: [num_docs + 1] boundaries."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
        if doc_offsets.ndim != 1 or doc_offsets.size < 2 or doc_offsets[0] != 0 or doc_offsets[-1] != len(tokens):
            raise ValueError("doc_offsets must run from 0 to len(tokens) with one entry per document plus one")
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.split = split
        self.eod_id = int(eod_id)
        # Stable across processes and Python versions (unlike hash()).
        self._split_code = zlib.crc32(split.encode("utf-8"))

        raw_lengths = np.diff(doc_offsets)
        self.doc_lengths = (raw_lengths + 1).astype(np.int32)  # + the end-of-document token
        self.doc_starts = doc_offsets[:-1] + np.arange(len(raw_lengths), dtype=np.int64)
        self.tokens = self._append_eod(np.asarray(tokens), doc_offsets, self.eod_id)
        self._finish_init()

    @classmethod
    def over_documents(cls, tokens: np.ndarray, doc_starts: np.ndarray, doc_lengths: np.ndarray, *, seq_len: int,
                       seed: int, split: str) -> "GPTSampleDataset":
        """Documents used in place: ``tokens`` may be a memory-mapped corpus (a Megatron indexed
        dataset, never copied) whose documents already end with their end-of-document token;
        document d is tokens[doc_starts[d] : doc_starts[d] + doc_lengths[d]], in any order."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self = cls.__new__(cls)
        self.seq_len, self.seed, self.split, self.eod_id = int(seq_len), int(seed), split, None
        self._split_code = zlib.crc32(split.encode("utf-8"))
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        self.doc_lengths = np.asarray(doc_lengths, dtype=np.int32)
        self.tokens = tokens
        self._finish_init(num_tokens=int(self.doc_lengths.sum(dtype=np.int64)))
        return self

    def _finish_init(self, num_tokens: Optional[int] = None) -> None:
        self.num_docs = len(self.doc_lengths)
        self.num_tokens = len(self.tokens) if num_tokens is None else num_tokens
        # Independent of the document order, so known without building an epoch.
        self.samples_per_epoch = (self.num_tokens - 1) // self.seq_len
        if self.samples_per_epoch < 1:
            raise ValueError(
                f"{self.num_tokens} tokens in {self.num_docs} documents, fewer than one sample of "
                f"train.seq_len + 1 = {self.seq_len + 1}"
            )
        self._epoch_index: Optional[EpochIndex] = None  # the most recently used epoch
        self._index_dir: Optional[Path] = None  # where epoch indices are cached (cache_indices_in)

    @staticmethod
    def _append_eod(tokens: np.ndarray, doc_offsets: np.ndarray, eod_id: int) -> np.ndarray:
        """One copy of the tokens with eod_id after each document, in the tokens' dtype."""
        num_docs = len(doc_offsets) - 1
        out = np.empty(len(tokens) + num_docs, dtype=tokens.dtype)
        # Document d ends at doc_offsets[d + 1] in the input, shifted by the d + 1 EODs up to it.
        eod_positions = doc_offsets[1:] + np.arange(num_docs, dtype=np.int64)
        is_eod = np.zeros(len(out), dtype=bool)
        is_eod[eod_positions] = True
        out[is_eod] = eod_id
        out[~is_eod] = tokens
        return out

    def __len__(self) -> int:
        """Samples per epoch. The stream itself is infinite: any i >= 0 is a valid index."""
        return self.samples_per_epoch

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch, self._split_code])))

    def cache_indices_in(self, directory: Path) -> "GPTSampleDataset":
        """Keep each epoch's indices under ``directory``, keyed by everything that defines them (the
        documents' lengths, seq_len, seed, split, epoch): a restart or another rank loads them."""
        self._index_dir = Path(directory)
        return self

    def _index_files(self, epoch: int) -> Optional[Dict[str, Path]]:
        if self._index_dir is None:
            return None
        lengths_digest = hashlib.sha256(np.ascontiguousarray(self.doc_lengths).tobytes()).hexdigest()
        key = cache_key(["gpt-index", lengths_digest, str(self.seq_len), str(self.seed), self.split, str(epoch)])
        return {name: self._index_dir / f"{key}.{name}.npy" for name in ("doc_order", "sample_idx", "sample_order")}

    def _build_epoch_index(self, epoch: int) -> EpochIndex:
        rng = self._rng(epoch)
        doc_order = rng.permutation(self.num_docs).astype(np.int64)
        sample_idx = build_sample_idx(self.doc_lengths, doc_order, self.seq_len)
        assert len(sample_idx) == self.samples_per_epoch + 1
        sample_order = rng.permutation(self.samples_per_epoch).astype(np.int64)
        return EpochIndex(epoch, doc_order, sample_idx, sample_order)

    def epoch_index(self, epoch: int) -> EpochIndex:
        if self._epoch_index is None or self._epoch_index.epoch != epoch:
            files = self._index_files(epoch)
            if files is not None and all(path.is_file() for path in files.values()):
                self._epoch_index = EpochIndex(epoch, *(np.load(files[name], mmap_mode="r") for name in files))
            else:
                self._epoch_index = self._build_epoch_index(epoch)
                if files is not None:  # sample_order last: its presence means all three are complete
                    for name, path in files.items():
                        save_npy_atomic(path, getattr(self._epoch_index, name))
        return self._epoch_index

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        epoch, step = divmod(i, self.samples_per_epoch)
        index = self.epoch_index(epoch)
        sample = int(index.sample_order[step])
        first_pos, first_offset = index.sample_idx[sample]
        last_pos, last_offset = index.sample_idx[sample + 1]
        if first_pos == last_pos:  # the common case: one document holds the whole sample
            start = self.doc_starts[index.doc_order[first_pos]] + first_offset
            return self.tokens[start : start + self.seq_len + 1].astype(np.int64)
        pieces = []
        for pos in range(first_pos, last_pos + 1):
            doc = index.doc_order[pos]
            begin = first_offset if pos == first_pos else 0
            end = last_offset + 1 if pos == last_pos else self.doc_lengths[doc]
            start = self.doc_starts[doc]
            pieces.append(self.tokens[start + begin : start + end])
        sample_tokens = np.concatenate(pieces).astype(np.int64)
        assert len(sample_tokens) == self.seq_len + 1
        return sample_tokens


def get_batch(dataset: GPTSampleDataset, start: int, count: int) -> torch.Tensor:
    """Samples start .. start + count - 1 of the stream as a LongTensor [count, seq_len + 1]."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rows = np.empty((count, dataset.seq_len + 1), dtype=np.int64)
    for row, i in enumerate(range(start, start + count)):
        rows[row] = dataset[i]
    return torch.from_numpy(rows)
