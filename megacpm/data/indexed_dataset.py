"""Megatron-LM's indexed dataset (MMIDIDX, version 1), read and written byte-compatibly.

Why this format: it is what Megatron-LM's ``tools/preprocess_data.py`` produces and what its GPT
datasets consume, so corpora tokenized for Megatron train here unchanged, and the other way round.
A corpus is a pair of files sharing a prefix:

* ``PREFIX.bin``: every sequence's token ids back to back, in one dtype.
* ``PREFIX.idx`` (little-endian): the 9-byte magic ``MMIDIDX\\0\\0``; version u64 = 1; a dtype code
  u8 (see DTYPE_CODES); the sequence count u64; the document-index count u64; then int32 sequence
  lengths, int64 byte offsets of the sequences in .bin, and int64 document indices: document i is
  sequences ``document_indices[i] .. document_indices[i + 1] - 1``, running from 0 to the sequence
  count (one sequence per document in the usual case).

Both files are memory-mapped, never read whole: a corpus may be far larger than memory, and the
operating system shares the pages between the processes of one node. The writer streams the tokens
to disk as they come and keeps only the sequence lengths in memory; it writes under temporary names
and renames on success, so a reader never sees half a corpus.
"""
from __future__ import annotations

import contextlib
import operator
import os
import struct
from array import array
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple, Union

import numpy as np

from megacpm.data.errors import DataError
from megacpm.io.atomic import fsync_dir, tmp_sibling

PathLike = Union[str, os.PathLike]

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version, dtype code, sequence count, document-index count
HEADER = struct.Struct("<9sQBQQ")

DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}
# Token ids are integers: a float corpus is refused when opened. Signed integer corpora are read (Megatron
# itself writes int32 for vocabularies over 65,500, and so does the writer here past 65,536), and
# check_token_ids refuses a negative id in them before training.
TOKEN_DTYPE_KINDS = "ui"

# Vocabularies up to this size store their token ids as uint16, larger ones as int32.
UINT16_VOCAB_LIMIT = 1 << 16

LENGTH_DTYPE = np.dtype("<i4")
POINTER_DTYPE = np.dtype("<i8")


def index_path(prefix: PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def data_path(prefix: PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else int32: the token dtype of a corpus
    (build.py's cached tokens too)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB_LIMIT else np.int32)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn the OS errors of reading ``path`` into one-line DataErrors naming it."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def _map_readonly(path: Path) -> np.ndarray:
    """The file's bytes as a read-only uint8 memmap (an empty array for an empty file: mmap refuses those)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


class _Index:
    """The parsed, validated .idx file; its arrays are views into a memmap of the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with _reading(path), open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER.size)
        if len(head) < HEADER.size:
            raise DataError(f"{path}: truncated index: {size} bytes, the header alone needs {HEADER.size}")
        magic, version, code, num_sequences, num_doc_indices = HEADER.unpack(head)
        if magic != MAGIC:
            raise DataError(f"{path}: not a Megatron indexed-dataset index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise DataError(f"{path}: unsupported index version {version} (megacpm reads version {VERSION})")
        if code not in DTYPE_CODES:
            raise DataError(f"{path}: unknown dtype code {code} (known: {', '.join(map(str, DTYPE_CODES))})")
        if DTYPE_CODES[code].kind not in TOKEN_DTYPE_KINDS:
            raise DataError(f"{path}: dtype code {code} ({DTYPE_CODES[code]}) is not an integer type: token ids "
                            "are integers (a corpus is uint16, or int32 for vocabularies over 65,536)")
        self.dtype = DTYPE_CODES[code]
        self._check_size(size, num_sequences, num_doc_indices)

        with _reading(path):
            raw = _map_readonly(path)
        lengths_end = HEADER.size + num_sequences * LENGTH_DTYPE.itemsize
        pointers_end = lengths_end + num_sequences * POINTER_DTYPE.itemsize
        self.sequence_lengths = raw[HEADER.size : lengths_end].view(LENGTH_DTYPE)
        self.sequence_pointers = raw[lengths_end:pointers_end].view(POINTER_DTYPE)
        self.document_indices = raw[pointers_end:].view(POINTER_DTYPE)
        self._check_document_indices()
        self._check_sequences()

    def _check_size(self, size: int, num_sequences: int, num_doc_indices: int) -> None:
        expected = (
            HEADER.size
            + num_sequences * (LENGTH_DTYPE.itemsize + POINTER_DTYPE.itemsize)
            + num_doc_indices * POINTER_DTYPE.itemsize
        )
        if size < expected:
            raise DataError(
                f"{self.path}: truncated index: {size} bytes, its header promises {expected} "
                f"({num_sequences} sequences, {num_doc_indices} document indices)"
            )
        if size > expected:
            raise DataError(
                f"{self.path}: {size - expected} unexpected bytes after the document indices "
                f"(expected {expected} bytes; multimodal indices are not supported)"
            )

    def _check_document_indices(self) -> None:
        doc_idx, count = self.document_indices, len(self.sequence_lengths)
        if len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] != count:
            shown = f"{doc_idx[0]} .. {doc_idx[-1]}" if len(doc_idx) else "none"
            raise DataError(
                f"{self.path}: document indices must run from 0 to the sequence count {count}, got {shown}"
            )

    def _check_sequences(self, chunk: int = 1 << 22) -> None:
        """Every sequence length >= 0 and the sequences back to back from byte 0 (how every writer of
        the format lays them out, and what document_spans relies on): one vectorised pass, in chunks."""
        lengths, pointers, itemsize = self.sequence_lengths, self.sequence_pointers, self.dtype.itemsize
        expected_start = 0
        for start in range(0, len(lengths), chunk):
            part = lengths[start:start + chunk].astype(np.int64)
            if len(part) and part.min() < 0:
                i = start + int(np.argmax(part < 0))
                raise DataError(f"{self.path}: sequence {i} has a negative length {int(lengths[i])}")
            expected = expected_start + np.concatenate([[0], np.cumsum(part[:-1])]) * itemsize
            wrong = np.flatnonzero(pointers[start:start + chunk] != expected)
            if len(wrong):
                i = start + int(wrong[0])
                raise DataError(f"{self.path}: sequence {i} starts at byte {int(pointers[i])}, expected "
                                f"{int(expected[wrong[0]])} (the sequences must lie back to back in the .bin)")
            expected_start = int(expected[-1]) + int(part[-1]) * itemsize if len(part) else expected_start
        steps = np.diff(self.document_indices)
        if len(steps) and steps.min() < 0:
            d = int(np.argmax(steps < 0))
            raise DataError(f"{self.path}: document indices decrease at document {d} "
                            f"({int(self.document_indices[d])} then {int(self.document_indices[d + 1])})")

    def data_bytes(self) -> int:
        """Size the .bin file must have: the end of the last sequence."""
        if len(self.sequence_lengths) == 0:
            return 0
        return int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str, chunk: int = 1 << 26) -> None:
    """Refuse token ids the model cannot embed, outside [0, vocab_size): one pass over the tokens, in
    chunks. Both ends are checked whatever the dtype (a signed corpus can hold negative ids, which an
    embedding would read from the end of its table or refuse mid-run)."""
    if tokens.dtype.kind not in TOKEN_DTYPE_KINDS:
        raise DataError(f"{where}: token ids are {tokens.dtype}, not integers")
    info = np.iinfo(tokens.dtype)
    check_low, check_high = info.min < 0, info.max >= vocab_size
    if not (check_low or check_high):
        return  # every value the dtype can hold is a valid id
    for start in range(0, len(tokens), chunk):
        part = tokens[start:start + chunk]
        if not len(part):
            continue
        low, high = int(part.min()), int(part.max())
        if (check_low and low < 0) or (check_high and high >= vocab_size):
            bad = low if low < 0 else high
            offset = start + int(np.argmax(part == bad))
            raise DataError(f"{where}: holds token id {bad} (token {offset:,}), outside model.vocab_size "
                            f"{vocab_size} (ids must be in [0, {vocab_size}))")


class IndexedDataset:
    """A Megatron indexed dataset: ``ds[i]`` is sequence i's tokens (a 1-D view into the memmap)."""

    def __init__(self, prefix: PathLike) -> None:
        self.prefix = os.fspath(prefix)
        self._index = _Index(index_path(prefix))
        self._bin_path = data_path(prefix)
        self._bin = self._open_data(self._index.data_bytes())

    def _open_data(self, expected: int) -> np.ndarray:
        with _reading(self._bin_path):
            size = self._bin_path.stat().st_size
            raw = _map_readonly(self._bin_path)
        if size != expected:
            raise DataError(
                f"{self._bin_path}: {size} bytes, but {self._index.path} places its last sequence's "
                f"end at byte {expected}"
            )
        return raw

    @property
    def dtype(self) -> np.dtype:
        return self._index.dtype

    @property
    def tokens(self) -> np.ndarray:
        """Every token of the .bin file as one 1-D array in the file's dtype (a view of the memmap)."""
        usable = len(self._bin) - len(self._bin) % self.dtype.itemsize
        return self._bin[:usable].view(self.dtype)

    def document_spans(self) -> Tuple[np.ndarray, np.ndarray]:
        """(first token, token count) of each document, in tokens of ``self.tokens``; a document's
        sequences lie back to back, as every writer of the format lays them out."""
        firsts = self.document_indices[:-1]
        lengths = self.sequence_lengths.astype(np.int64)
        ends = np.concatenate([[0], np.cumsum(lengths)])
        starts = self.sequence_pointers[np.minimum(firsts, len(self) - 1)] // self.dtype.itemsize if len(self) else firsts
        return np.asarray(starts, dtype=np.int64), ends[self.document_indices[1:]] - ends[firsts]

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 [len(self)]: tokens per sequence."""
        return self._index.sequence_lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64 [len(self)]: byte offset of each sequence in the .bin file."""
        return self._index.sequence_pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64 [documents + 1]: document i is sequences document_indices[i] .. [i + 1] - 1."""
        return self._index.document_indices

    def __len__(self) -> int:
        return len(self._index.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens offset .. offset + length - 1 of sequence i (to its end when length is None)."""
        i = self._sequence_number(i)
        full = int(self._index.sequence_lengths[i])
        if full < 0:
            raise DataError(f"{self._index.path}: sequence {i} has a negative length {full}")
        if length is None:
            length = full - offset
        if offset < 0 or length < 0 or offset + length > full:
            raise IndexError(f"tokens {offset} .. {offset + length} of sequence {i}, which has {full}")
        itemsize = self.dtype.itemsize
        start = int(self._index.sequence_pointers[i]) + offset * itemsize
        stop = start + length * itemsize
        if start < 0 or stop > len(self._bin):
            raise DataError(
                f"{self._index.path}: sequence {i} lies at bytes {start} .. {stop}, "
                f"beyond the end of {self._bin_path} ({len(self._bin)} bytes)"
            )
        return self._bin[start:stop].view(self.dtype)

    def _sequence_number(self, i) -> int:
        count, i = len(self), operator.index(i)
        if not -count <= i < count:
            raise IndexError(f"sequence {i} of a dataset with {count} sequences")
        return i % count

    def __repr__(self) -> str:
        documents = len(self.document_indices) - 1
        return f"IndexedDataset({self.prefix!r}: {len(self)} sequences, {documents} documents, {self.dtype})"


class IndexedDatasetWriter:
    """Writes PREFIX.bin / PREFIX.idx; use as a context manager.

    ``add_document(ids)`` writes one document of one sequence (Megatron's usual layout);
    ``add_sequences([...])`` then ``end_document()`` writes a document of several. Tokens go to a
    temporary .bin as they come; on leaving the block both files are fsynced and renamed into
    place. If the block raises, nothing is left behind (an existing corpus at PREFIX is untouched).
    """

    def __init__(self, prefix: PathLike, vocab_size: int) -> None:
        self.prefix = os.fspath(prefix)
        self.vocab_size = int(vocab_size)
        self.dtype = dtype_for_vocab(self.vocab_size)
        self._final = (data_path(prefix), index_path(prefix))
        self._tmp = tuple(tmp_sibling(path) for path in self._final)
        self._lengths = array("i")  # int32, as in the index: 4 bytes per sequence held in memory
        self._document_indices = array("q", [0])
        self._closed = False
        try:
            self._bin = open(self._tmp[0], "wb")
        except OSError as err:
            raise DataError(f"{self._final[0]}: cannot write ({err.strerror or err})") from None

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._document_indices) - 1

    def add_sequences(self, sequences: Iterable) -> None:
        """Append sequences (each a 1-D sequence of token ids) to the current document."""
        for sequence in sequences:
            tokens = self._as_tokens(sequence)
            self._bin.write(tokens.tobytes())
            self._lengths.append(len(tokens))

    def end_document(self) -> None:
        """Close the current document (a document may also hold no sequence)."""
        self._document_indices.append(len(self._lengths))

    def add_document(self, token_ids) -> None:
        """One document made of one sequence."""
        self.add_sequences([token_ids])
        self.end_document()

    def _as_tokens(self, sequence) -> np.ndarray:
        tokens = np.asarray(sequence)
        if tokens.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {tokens.shape}")
        if tokens.size == 0:
            return tokens.astype(self.dtype)
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got {tokens.dtype}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise DataError(f"{self.prefix}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return tokens.astype(self.dtype, copy=False)

    def close(self) -> None:
        """Write the index and move both files into place (documents left open are ended)."""
        if self._closed:
            return
        try:
            if self._document_indices[-1] != len(self._lengths):
                self.end_document()
            self._finish_data()
            self._write_index()
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Discard everything written so far."""
        self._closed = True
        self._bin.close()
        for tmp in self._tmp:
            tmp.unlink(missing_ok=True)

    def _finish_data(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()

    def _index_bytes(self) -> Tuple[bytes, ...]:
        lengths = np.frombuffer(self._lengths, dtype=np.int32).astype(LENGTH_DTYPE, copy=False)
        pointers = np.zeros(len(lengths), dtype=POINTER_DTYPE)
        pointers[1:] = np.cumsum(lengths[:-1], dtype=np.int64) * self.dtype.itemsize
        document_indices = np.frombuffer(self._document_indices, dtype=np.int64).astype(POINTER_DTYPE, copy=False)
        header = HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[self.dtype], len(lengths), len(document_indices))
        return header, lengths.tobytes(), pointers.tobytes(), document_indices.tobytes()

    def _write_index(self) -> None:
        with open(self._tmp[1], "wb") as f:
            for part in self._index_bytes():
                f.write(part)
            f.flush()
            os.fsync(f.fileno())

    def _publish(self) -> None:
        # .bin first, the index last: readers start from the index. A crash between the two renames
        # can pair a new .bin with an old index; the reader's .bin size check catches that unless
        # the two corpora happen to have the same size.
        for tmp, final in zip(self._tmp, self._final):
            os.replace(tmp, final)
        fsync_dir(self._final[0].parent)
