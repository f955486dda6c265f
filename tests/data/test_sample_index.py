"""build_sample_idx: C++ == numpy reference == brute-force concatenation."""
import numpy as np
import pytest

from megacpm.data import sample_index
from megacpm.data.sample_index import build_sample_idx, build_sample_idx_numpy


def random_case(rng):
    num_docs = int(rng.integers(1, 25))
    lengths = rng.integers(0, 40, num_docs).astype(np.int32)
    lengths[rng.random(num_docs) < 0.2] = 1  # length-1 documents
    lengths[rng.random(num_docs) < 0.1] = 0  # empty documents
    order = rng.permutation(num_docs).astype(np.int64)
    seq_len = int(rng.integers(1, 50))  # often longer than the documents
    return lengths, order, seq_len


def brute_force_samples(lengths, order, seq_len):
    """Each sample's (doc id, offset) per token, from an explicit concatenation."""
    stream = [(int(d), k) for d in order for k in range(lengths[d])]
    num_samples = max(len(stream) - 1, 0) // seq_len
    return stream, [stream[j * seq_len : j * seq_len + seq_len + 1] for j in range(num_samples)]


def samples_from_index(sample_idx, lengths, order):
    samples = []
    for j in range(len(sample_idx) - 1):
        (p0, o0), (p1, o1) = sample_idx[j], sample_idx[j + 1]
        tokens = []
        for p in range(p0, p1 + 1):
            d = int(order[p])
            begin = o0 if p == p0 else 0
            end = o1 + 1 if p == p1 else lengths[d]
            tokens.extend((d, k) for k in range(begin, end))
        samples.append(tokens)
    return samples


def test_numpy_reference_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(500):
        lengths, order, seq_len = random_case(rng)
        sample_idx = build_sample_idx_numpy(lengths, order, seq_len)
        _, expected = brute_force_samples(lengths, order, seq_len)
        assert sample_idx.dtype == np.int64 and sample_idx.shape == (len(expected) + 1, 2)
        assert samples_from_index(sample_idx, lengths, order) == expected


@pytest.mark.skipif(not sample_index.has_cpp_extension(), reason="megacpm._C not built")
def test_cpp_matches_numpy_reference():
    from megacpm import _C

    rng = np.random.default_rng(1)
    for _ in range(2000):
        lengths, order, seq_len = random_case(rng)
        expected = build_sample_idx_numpy(lengths, order, seq_len)
        got = _C.build_sample_idx(lengths, order, seq_len)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected)


@pytest.mark.skipif(not sample_index.has_cpp_extension(), reason="megacpm._C not built")
def test_cpp_matches_numpy_reference_on_large_inputs():
    from megacpm import _C

    rng = np.random.default_rng(3)
    for _ in range(20):
        num_docs = int(rng.integers(1, 20_000))
        lengths = rng.integers(1, 3_000, num_docs).astype(np.int32)
        order = rng.permutation(num_docs).astype(np.int64)
        seq_len = int(rng.integers(1, 8_192))
        np.testing.assert_array_equal(
            _C.build_sample_idx(lengths, order, seq_len), build_sample_idx_numpy(lengths, order, seq_len)
        )


@pytest.mark.parametrize(
    "lengths, seq_len, num_samples",
    [
        ([1], 1, 0),  # one token: no sample (it needs seq_len + 1)
        ([2], 1, 1),
        ([1, 1, 1, 1], 1, 3),  # every document shorter than a sample
        ([0, 0, 5, 0], 2, 2),  # empty documents are skipped
        ([10], 3, 3),  # (10 - 1) // 3
        ([], 4, 0),
    ],
)
def test_edge_cases(lengths, seq_len, num_samples):
    lengths = np.array(lengths, dtype=np.int32)
    order = np.arange(len(lengths))
    result = build_sample_idx(lengths, order, seq_len)
    np.testing.assert_array_equal(result, build_sample_idx_numpy(lengths, order, seq_len))
    assert len(result) == num_samples + 1


def test_large_lengths_use_int64():
    lengths = np.full(3, 2**31 - 1, dtype=np.int32)  # total exceeds int32
    result = build_sample_idx(lengths, np.arange(3), 2**30)
    np.testing.assert_array_equal(result, build_sample_idx_numpy(lengths, np.arange(3), 2**30))
    assert len(result) - 1 == (3 * (2**31 - 1) - 1) // 2**30


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        build_sample_idx(np.array([3], dtype=np.int32), np.array([1]), 2)
    with pytest.raises(ValueError):
        build_sample_idx(np.array([3], dtype=np.int32), np.array([0]), 0)


def test_dispatcher_falls_back_to_numpy(monkeypatch):
    rng = np.random.default_rng(2)
    lengths, order, seq_len = random_case(rng)
    with_extension = build_sample_idx(lengths, order, seq_len)
    monkeypatch.setattr(sample_index, "_cpp", None)
    assert not sample_index.has_cpp_extension()
    np.testing.assert_array_equal(build_sample_idx(lengths, order, seq_len), with_extension)
