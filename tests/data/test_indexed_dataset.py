"""IndexedDataset / IndexedDatasetWriter against Megatron-LM's MMIDIDX layout, written here by hand.

The reference writer below follows the format description only (struct + numpy), not the code under
test: reading its files checks the reader, and byte-identical output checks the writer.
"""
import struct

import numpy as np
import pytest

from megacpm.data import DataError, IndexedDataset, IndexedDatasetWriter
from megacpm.data.indexed_dataset import check_token_ids

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODE = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}


def write_reference(prefix, documents, dtype, version=1, code=None):
    """documents: a list of documents, each a list of sequences (lists of token ids)."""
    dtype = np.dtype(dtype)
    sequences = [np.asarray(s, dtype=dtype) for doc in documents for s in doc]
    lengths = np.array([len(s) for s in sequences], dtype="<i4")
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64) * dtype.itemsize]).astype("<i8")
    pointers = pointers[: len(sequences)]
    doc_idx = np.concatenate([[0], np.cumsum([len(doc) for doc in documents])]).astype("<i8")
    with open(f"{prefix}.bin", "wb") as f:
        for s in sequences:
            f.write(s.tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", version))
        f.write(struct.pack("<B", DTYPE_CODE[dtype] if code is None else code))
        f.write(struct.pack("<Q", len(sequences)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(lengths.tobytes() + pointers.tobytes() + doc_idx.tobytes())
    return prefix


def sample_documents(rng, vocab, num_docs=20):
    """Random documents of 1 to 3 sequences each; some sequences empty."""
    return [
        [rng.integers(0, vocab, rng.integers(0, 50)).tolist() for _ in range(rng.integers(1, 4))]
        for _ in range(num_docs)
    ]


@pytest.mark.parametrize("dtype, vocab", [(np.uint16, 65536), (np.int32, 200_000)])
def test_reads_the_reference_layout(tmp_path, dtype, vocab):
    documents = sample_documents(np.random.default_rng(0), vocab)
    documents[0] = [[vocab - 1, 0, 1]]  # the extreme ids survive
    ds = IndexedDataset(write_reference(tmp_path / "ref", documents, dtype))
    sequences = [s for doc in documents for s in doc]
    assert len(ds) == len(sequences)
    assert ds.dtype == np.dtype(dtype)
    for i, expected in enumerate(sequences):
        assert ds[i].ndim == 1 and ds[i].dtype.kind in "iu"
        assert ds[i].tolist() == expected
    np.testing.assert_array_equal(ds.sequence_lengths, [len(s) for s in sequences])
    np.testing.assert_array_equal(ds.document_indices, np.cumsum([0] + [len(d) for d in documents]))
    assert ds[-1].tolist() == sequences[-1]


def test_partial_reads_and_index_errors(tmp_path):
    ds = IndexedDataset(write_reference(tmp_path / "ref", [[[5, 6, 7, 8]], [[9]]], np.uint16))
    assert ds.get(0, offset=1).tolist() == [6, 7, 8]
    assert ds.get(0, offset=1, length=2).tolist() == [6, 7]
    assert ds.get(np.int64(1)).tolist() == [9]
    for bad in (2, -3):
        with pytest.raises(IndexError):
            ds[bad]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=3)


def test_items_are_memory_mapped(tmp_path):
    ds = IndexedDataset(write_reference(tmp_path / "ref", [[[1, 2, 3]], [[4, 5]]], np.uint16))
    item = ds[1]
    assert isinstance(item, np.memmap) or isinstance(item.base, np.memmap)
    assert not item.flags.writeable


@pytest.mark.parametrize("vocab, dtype", [(50_000, np.uint16), (65_536, np.uint16), (65_537, np.int32)])
def test_writer_is_byte_identical_to_the_reference(tmp_path, vocab, dtype):
    documents = sample_documents(np.random.default_rng(1), vocab)
    write_reference(tmp_path / "ref", documents, dtype)
    with IndexedDatasetWriter(tmp_path / "out", vocab) as writer:
        for doc in documents:
            if len(doc) == 1:
                writer.add_document(doc[0])
            else:
                writer.add_sequences(np.asarray(s, dtype=np.int64) for s in doc)
                writer.end_document()
    for suffix in (".idx", ".bin"):
        assert (tmp_path / f"out{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes(), suffix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "out.idx", "ref.bin", "ref.idx"]


def test_empty_dataset_round_trips(tmp_path):
    with IndexedDatasetWriter(tmp_path / "empty", 100):
        pass
    ds = IndexedDataset(tmp_path / "empty")
    assert len(ds) == 0 and ds.document_indices.tolist() == [0]


def test_failure_inside_the_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "out", 1000) as writer:
            writer.add_document(range(100))
            raise RuntimeError("tokenizer crashed")
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_an_existing_dataset(tmp_path):
    write_reference(tmp_path / "ds", [[[1, 2]]], np.uint16)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(DataError, match="token id 1000 is outside the vocabulary"):
        with IndexedDatasetWriter(tmp_path / "ds", 1000) as writer:
            writer.add_document([1, 2, 1000])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def corrupt(path, edit):
    data = bytearray(path.read_bytes())
    edit(data)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (lambda p: (p.parent / "ds.idx").unlink(), "idx", "no such file"),
        (lambda p: (p.parent / "ds.bin").unlink(), "bin", "no such file"),
        (lambda p: corrupt(p.parent / "ds.idx", lambda d: d.__setitem__(slice(0, 4), b"XXXX")), "idx", "magic"),
        (lambda p: corrupt(p.parent / "ds.idx", lambda d: d.__setitem__(slice(9, 17), struct.pack("<Q", 2))),
         "idx", "version 2"),
        (lambda p: corrupt(p.parent / "ds.idx", lambda d: d.__setitem__(17, 9)), "idx", "dtype code 9"),
        (lambda p: corrupt(p.parent / "ds.idx", lambda d: d.__delitem__(slice(-5, None))), "idx", "truncated"),
        (lambda p: corrupt(p.parent / "ds.idx", lambda d: d.__delitem__(slice(20, None))), "idx", "truncated"),
        (lambda p: corrupt(p.parent / "ds.idx", lambda d: d.extend(b"\0" * 3)), "idx", "unexpected bytes"),
        (lambda p: corrupt(p.parent / "ds.bin", lambda d: d.__delitem__(slice(-2, None))), "bin", "bytes"),
        (lambda p: corrupt(p.parent / "ds.bin", lambda d: d.extend(b"\0\0")), "bin", "bytes"),
        (lambda p: corrupt(p.parent / "ds.idx", lambda d: d.__setitem__(slice(-8, None), struct.pack("<q", 7))),
         "idx", "document indices"),
    ],
)
def test_malformed_inputs_raise_data_error_naming_the_file(tmp_path, damage, file, message):
    prefix = write_reference(tmp_path / "ds", [[[1, 2, 3]], [[4], [5, 6]]], np.uint16)
    damage(prefix)
    with pytest.raises(DataError, match=message) as info:
        IndexedDataset(prefix)
    assert str(tmp_path / f"ds.{file}") in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("code, name", [(6, "float64"), (7, "float32")])
def test_a_float_dtype_code_is_refused_when_opening(tmp_path, code, name):
    prefix = write_reference(tmp_path / "ds", [[[1, 2, 3, 4]]], np.uint16, code=code)
    with pytest.raises(DataError, match=rf"ds\.idx: dtype code {code} \({name}\) is not an integer type"):
        IndexedDataset(prefix)


@pytest.mark.parametrize("edit, message", [
    # the second sequence's length (int32 at byte 34 + 4) made negative
    (lambda d: d.__setitem__(slice(38, 42), struct.pack("<i", -1)), "sequence 1 has a negative length -1"),
    # the second sequence's pointer (int64 after the 3 lengths) moved off the back-to-back layout
    (lambda d: d.__setitem__(slice(34 + 12 + 8, 34 + 12 + 16), struct.pack("<q", 2)),
     "sequence 1 starts at byte 2, expected 6"),
])
def test_sequence_layout_is_checked_when_opening(tmp_path, edit, message):
    prefix = write_reference(tmp_path / "ds", [[[1, 2, 3]], [[4], [5, 6]]], np.uint16)
    corrupt(tmp_path / "ds.idx", edit)
    with pytest.raises(DataError, match=message) as info:
        IndexedDataset(prefix)
    assert str(tmp_path / "ds.idx") in str(info.value)


@pytest.mark.parametrize("dtype, ids, vocab, bad", [
    (np.int32, [1, 2, -7, 3], 100, -7),  # the max alone passed this: the class of signed corpora
    (np.int8, [1, -1, 2], 1000, -1),  # int8 cannot exceed 1000: the check used to stop there
    (np.int32, [1, 2, 100], 100, 100),
    (np.uint16, [1, 2, 300], 256, 300),
])
def test_token_ids_outside_the_vocabulary_are_refused(dtype, ids, vocab, bad):
    with pytest.raises(DataError, match=rf"c\.bin: holds token id {bad} \(token {ids.index(bad)}\), "
                                        rf"outside model\.vocab_size {vocab}"):
        check_token_ids(np.asarray(ids, dtype=dtype), vocab, "c.bin", chunk=2)


def test_token_ids_inside_the_vocabulary_pass():
    check_token_ids(np.asarray([0, 65535], dtype=np.uint16), 65536, "c.bin")  # nothing to check
    check_token_ids(np.asarray([0, 5, 99], dtype=np.int32), 100, "c.bin", chunk=2)
