"""GPTSampleDataset: samples are pure functions of (seed, i); epochs are permutations."""
import numpy as np
import pytest
import torch

from megacpm.data import GPTSampleDataset, get_batch

EOD = 0


def make_docs(rng, num_docs=30, max_len=40):
    """Distinct token values per position (never EOD), so a window pins down its stream position."""
    lengths = rng.integers(1, max_len, num_docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.arange(1, offsets[-1] + 1, dtype=np.int32)
    return tokens, offsets


def make_dataset(seed=7, seq_len=16, split="train", docs_seed=0):
    tokens, offsets = make_docs(np.random.default_rng(docs_seed))
    return GPTSampleDataset(tokens, offsets, seq_len=seq_len, seed=seed, eod_id=EOD, split=split)


def test_samples_are_a_function_of_seed_and_index():
    first, second = make_dataset(), make_dataset()
    indices = [0, 1, 5, len(first) - 1, len(first), 3 * len(first) + 2]
    for i in indices:
        np.testing.assert_array_equal(first[i], second[i])
    # Access order does not matter (the epoch cache is only a cache).
    later_first = [make_dataset()[i] for i in reversed(indices)]
    for i, sample in zip(reversed(indices), later_first):
        np.testing.assert_array_equal(first[i], sample)


def test_different_seeds_and_splits_differ():
    base = make_dataset(seed=7)
    other_seed = make_dataset(seed=8)
    other_split = make_dataset(seed=7, split="valid")
    n = len(base)
    assert any(not np.array_equal(base[i], other_seed[i]) for i in range(n))
    assert any(not np.array_equal(base[i], other_split[i]) for i in range(n))


def expected_stream(ds, doc_order):
    return np.concatenate([ds.tokens[ds.doc_starts[d] : ds.doc_starts[d] + ds.doc_lengths[d]] for d in doc_order])


@pytest.mark.parametrize("epoch", [0, 1, 4])
def test_epoch_covers_every_sample_once(epoch):
    ds = make_dataset()
    n, seq_len = len(ds), ds.seq_len
    samples = [ds[epoch * n + k] for k in range(n)]
    stream = expected_stream(ds, ds.epoch_index(epoch).doc_order)
    # Every window j*seq_len .. j*seq_len + seq_len of the epoch's stream, each exactly once.
    windows = sorted(tuple(stream[j * seq_len : j * seq_len + seq_len + 1]) for j in range(n))
    assert sorted(tuple(s) for s in samples) == windows
    assert n == (len(stream) - 1) // seq_len


def test_epochs_reorder_documents_and_samples():
    ds = make_dataset()
    n = len(ds)
    assert not np.array_equal(ds.epoch_index(0).doc_order, ds.epoch_index(1).doc_order)
    assert any(not np.array_equal(ds[k], ds[n + k]) for k in range(n))


def test_documents_end_with_eod():
    tokens, offsets = make_docs(np.random.default_rng(3), num_docs=5)
    ds = GPTSampleDataset(tokens, offsets, seq_len=8, seed=1, eod_id=EOD, split="train")
    assert ds.num_tokens == len(tokens) + 5
    for d in range(5):
        doc = ds.tokens[ds.doc_starts[d] : ds.doc_starts[d] + ds.doc_lengths[d]]
        np.testing.assert_array_equal(doc[:-1], tokens[offsets[d] : offsets[d + 1]])
        assert doc[-1] == EOD
    assert (ds.tokens == EOD).sum() == 5


def test_sample_shape_dtype_and_get_batch():
    ds = make_dataset(seq_len=16)
    sample = ds[3]
    assert sample.dtype == np.int64 and sample.shape == (17,)
    batch = get_batch(ds, 10, 4)
    assert batch.dtype == torch.long and batch.shape == (4, 17)
    for row in range(4):
        np.testing.assert_array_equal(batch[row].numpy(), ds[10 + row])


def test_rejects_too_short_split_and_negative_index():
    tokens, offsets = np.arange(1, 5, dtype=np.int32), np.array([0, 4])
    with pytest.raises(ValueError):
        GPTSampleDataset(tokens, offsets, seq_len=8, seed=1, eod_id=EOD, split="valid")
    with pytest.raises(IndexError):
        make_dataset()[-1]
