"""The scaling-law fits against points generated from known constants, and the compute-optimal split
against a brute-force minimisation."""
import math

import numpy as np
import pytest

from megacpm.scaling.batch_size import optimal_batch_sizes, smooth, tokens_to_reach
from megacpm.scaling.laws import (PAPER_DATA_MODEL_LAW, DataModelLaw, FitError, fit_batch_size_law,
                                  fit_data_model_law)


def law_points(c_n, alpha, c_d, beta, l0, noise, seed=0):
    """A grid of (N, D, loss) from the formula written out here, with multiplicative noise."""
    n, d = np.meshgrid([0.009, 0.036, 0.066, 0.1, 0.17, 0.24, 0.5], [0.5, 1, 2, 5, 10, 20, 50])
    n, d = n.ravel(), d.ravel()
    loss = c_n * n ** -alpha + c_d * d ** -beta + l0
    return n, d, loss * (1 + noise * np.random.default_rng(seed).standard_normal(loss.shape))


@pytest.mark.parametrize("truth", [(0.0715, 0.29, 0.300, 0.23, 0.31), (0.2, 0.5, 1.5, 0.35, 1.2)])
def test_fit_recovers_known_constants_from_noisy_points(truth):
    c_n, alpha, c_d, beta, l0 = truth
    fit = fit_data_model_law(*law_points(*truth, noise=0.002))
    law = fit.law
    assert abs(law.alpha - alpha) < 0.03 and abs(law.beta - beta) < 0.03, law
    assert abs(law.L0 - l0) < 0.03, law
    assert abs(math.log(law.C_N / c_n)) < 0.15 and abs(math.log(law.C_D / c_d)) < 0.15, law
    assert fit.rmse < 0.01


def test_fit_without_noise_is_exact():
    truth = (0.0715, 0.29, 0.300, 0.23, 0.31)
    law = fit_data_model_law(*law_points(*truth, noise=0.0)).law
    assert np.allclose([law.C_N, law.alpha, law.C_D, law.beta, law.L0], truth, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("flops", [1e19, 1e21, 1e23])
def test_compute_optimal_split_matches_brute_force(flops):
    law = PAPER_DATA_MODEL_LAW
    nd = flops / 6 / 1e18  # N * D in billions squared
    n = np.geomspace(1e-4, 1e4, 400001)
    loss = 0.0715 * n ** -0.29 + 0.300 * (nd / n) ** -0.23 + 0.31
    n_best = n[np.argmin(loss)]
    n_opt, d_opt = law.optimal_split(flops)
    assert abs(n_opt / n_best - 1) < 1e-3
    assert abs(n_opt * d_opt - nd) < 1e-9 * nd
    assert law.tokens_per_parameter(flops) == pytest.approx(d_opt / n_opt)


def test_paper_law_gives_about_192_tokens_per_parameter():
    # The paper's figure for its budgets (~1e21-1e22 FLOPs): far above Chinchilla's ~20.
    ratios = [PAPER_DATA_MODEL_LAW.tokens_per_parameter(c) for c in (1e21, 1e22)]
    assert 150 < ratios[0] < 192 < ratios[1] < 260


def test_fit_refuses_points_that_cannot_determine_it():
    with pytest.raises(FitError, match="two model sizes"):
        fit_data_model_law([0.1] * 6, [1, 2, 3, 4, 5, 6], [3.0] * 6)
    with pytest.raises(FitError, match="at least 5"):
        fit_data_model_law([0.1, 0.2], [1, 2], [3, 2.9])
    with pytest.raises(FitError, match="positive"):
        fit_data_model_law([0.1, -0.2, 0.3, 0.4, 0.5], [1, 2, 3, 4, 5], [3, 3, 3, 3, 3])


def test_batch_size_law_fit_recovers_the_power_law():
    rng = np.random.default_rng(0)
    loss = np.linspace(2.5, 4.0, 12)
    batch = 1.21e9 / loss ** 6.24 * np.exp(0.02 * rng.standard_normal(loss.shape))
    law = fit_batch_size_law(loss, batch)
    assert law.b == pytest.approx(6.24, abs=0.15)
    assert law.batch_size(3.0) == pytest.approx(1.21e9 / 3.0 ** 6.24, rel=0.05)


def test_smooth_is_a_trailing_mean_over_tokens():
    tokens = np.arange(1, 11) * 100.0
    loss = np.arange(10, dtype=float)
    # 300 tokens of window: the points at t-200, t-100 and t.
    expected = [0, 0.5, 1, 2, 3, 4, 5, 6, 7, 8]
    assert np.allclose(smooth(tokens, loss, 300), expected)
    assert tokens_to_reach(tokens, 10 - loss, 4.5) == pytest.approx(650.0)
    assert tokens_to_reach(tokens, 10 - loss, 0.5) is None


def test_optimal_batch_sizes_find_the_minimum_of_tokens_to_loss():
    """Synthetic runs where reaching loss L with batch B takes T(L) * (B/B*(L) + B*(L)/B) / 2 tokens,
    B*(L) = a / L^b: the analysis must find B*(L), and the fit a and b. (b < 3 keeps T decreasing in
    L at every batch size, so each run's loss curve is its inverse.)"""
    a, b = 3e4, 2.0
    levels_true = np.linspace(3.0, 6.0, 301)
    curves = {}
    for batch in (256, 512, 1024, 2048, 4096, 8192, 16384):
        b_star = a / levels_true ** b
        needed = 1e8 * levels_true ** -3 * (batch / b_star + b_star / batch) / 2
        steps = np.arange(1, 100001)
        tokens = steps * batch
        # loss(t): invert the monotonic needed(L) (needed decreases with L).
        loss = np.interp(tokens, needed[::-1], levels_true[::-1], left=levels_true[-1], right=levels_true[0])
        curves[batch] = (tokens, loss)
    levels = [3.4, 3.7, 4.0, 4.4, 4.8]
    found = optimal_batch_sizes(curves, levels, window_tokens=1.0)  # noiseless: no smoothing
    assert [o.loss for o in found] == levels
    for o in found:
        assert not o.edge
        assert abs(math.log2(o.batch_tokens / (a / o.loss ** b))) < 0.25, o
    law = fit_batch_size_law([o.loss for o in found], [o.batch_tokens for o in found])
    assert law.b == pytest.approx(b, rel=0.1)


def test_data_model_law_is_the_formula():
    law = DataModelLaw(C_N=0.5, alpha=0.3, C_D=2.0, beta=0.2, L0=1.0)
    assert law.loss(2.0, 8.0) == pytest.approx(0.5 * 2 ** -0.3 + 2.0 * 8 ** -0.2 + 1.0)
    k = (0.3 * 0.5 / (0.2 * 2.0)) ** (1 / 0.5)
    assert law.K == pytest.approx(k) and law.eta == pytest.approx(-0.1 / 0.5)
