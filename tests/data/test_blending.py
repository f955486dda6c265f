"""The mixture order: C++ equals the numpy reference, every prefix is within one sample of the
target shares, and a longer build only extends a shorter one."""
import numpy as np
import pytest

from megacpm.data.blending import (build_blending_indices, build_blending_indices_numpy, has_cpp_blending,
                                   normalized_weights)


def random_weights(rng):
    k = int(rng.integers(1, 9))
    w = rng.random(k) ** 3  # skewed, with some tiny shares
    return w / w.sum()


@pytest.mark.parametrize("seed", range(6))
def test_cpp_equals_numpy_and_every_prefix_is_within_one_sample(seed):
    rng = np.random.default_rng(seed)
    weights = random_weights(rng)
    size = 3000
    index, within = build_blending_indices(weights, size)
    ref_index, ref_within = build_blending_indices_numpy(weights, size)
    if has_cpp_blending():
        assert np.array_equal(index, ref_index) and np.array_equal(within, ref_within)
    counts = np.zeros((size + 1, len(weights)), dtype=np.int64)  # counts[n]: taken after n samples
    np.add.at(counts[1:], (np.arange(size), index.astype(np.int64)), 1)
    counts = counts.cumsum(axis=0)
    target = np.arange(size + 1)[:, None] * weights[None, :]
    # Quota: floor(target) <= taken <= ceil(target) after every prefix (1e-9: float targets).
    assert np.all(counts >= np.floor(target + 1e-9)) and np.all(counts <= np.ceil(target - 1e-9))
    for d in range(len(weights)):  # each dataset's samples are taken in order 0, 1, 2, ...
        assert np.array_equal(within[index == d], np.arange((index == d).sum()))


def test_a_longer_build_extends_a_shorter_one():
    short = build_blending_indices([0.2, 0.5, 0.3], 1000)
    long = build_blending_indices([0.2, 0.5, 0.3], 5000)
    assert np.array_equal(long[0][:1000], short[0]) and np.array_equal(long[1][:1000], short[1])


@pytest.mark.parametrize("weights", [[], [0.0, 0.0], [1.0, -0.5], [float("nan")]])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError, match="weights"):
        normalized_weights(weights)
