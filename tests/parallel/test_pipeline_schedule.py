"""Pipeline schedules: every unit runs once, in-flight limits hold, and the simulated bubble matches theory."""
from collections import Counter

import pytest

from megacpm.parallel.pipeline_schedule import Action, build_schedule, one_f_one_b_bubble, simulate


@pytest.mark.parametrize("pp, m, vpp", [(1, 3, 1), (2, 4, 1), (4, 8, 1), (4, 3, 1), (2, 4, 2), (4, 8, 2), (3, 6, 3)])
def test_each_unit_once_and_backward_after_forward(pp, m, vpp):
    for rank in range(pp):
        actions = build_schedule(pp, rank, m, vpp)
        counts = Counter(actions)
        expected = {Action(k, mb, c) for k in "FB" for mb in range(m) for c in range(vpp)}
        assert set(counts) == expected and set(counts.values()) == {1}
        seen = set()
        for a in actions:
            if a.kind == "B":
                assert ("F", a.micro_batch, a.chunk) in seen
            seen.add((a.kind, a.micro_batch, a.chunk))


@pytest.mark.parametrize("pp, m", [(2, 8), (4, 8), (4, 16)])
def test_1f1b_in_flight_limit(pp, m):
    for rank in range(pp):
        in_flight = peak = 0
        for a in build_schedule(pp, rank, m):
            in_flight += 1 if a.kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak == min(pp - rank, m)


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (4, 16), (8, 8)])
def test_1f1b_bubble_matches_theory(pp, m):
    assert simulate(pp, m)["bubble_fraction"] == pytest.approx(one_f_one_b_bubble(pp, m))


@pytest.mark.parametrize("pp, m, vpp", [(2, 4, 2), (4, 8, 2), (4, 8, 4)])
def test_interleaving_shrinks_the_bubble(pp, m, vpp):
    plain = simulate(pp, m)["bubble_fraction"]
    interleaved = simulate(pp, m, vpp)["bubble_fraction"]
    assert interleaved < plain
    # Megatron's estimate: the bubble time divided by vpp.
    bubble_time = (pp - 1) * 3.0 / vpp
    assert interleaved == pytest.approx(bubble_time / (m * 3.0 + bubble_time), rel=0.02)


def test_interleaving_needs_micro_batches_multiple_of_pp():
    with pytest.raises(ValueError, match="parallel.vpp"):
        build_schedule(4, 0, 6, vpp=2)
