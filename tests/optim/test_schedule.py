"""LR schedules at their landmarks, against numbers computed by hand from the recipe's formulas."""
import math

import pytest

from megacpm.config import ScheduleConfig
from megacpm.optim import LRSchedule

ETA = 0.01


def schedule(total=1000, **fields):
    return LRSchedule.from_config(ScheduleConfig(**fields), ETA, total)


def test_wsd_exp_landmarks():
    s = schedule(warmup_steps=100, decay_start=800, half_life=50, min_lr=1e-4)
    assert s(50) == pytest.approx(ETA / 2)  # mid-warmup
    assert s(100) == s(400) == s(799) == ETA  # stable
    assert s(800) == ETA
    assert s(850) == pytest.approx(ETA / 2)  # one half-life into the decay
    assert s(900) == pytest.approx(ETA / 4)
    assert s(1000) == pytest.approx(ETA * 0.5 ** 4)  # 200 steps = 4 half-lives, above the floor

def test_wsd_exp_floor_holds():
    s = schedule(decay_start=100, half_life=10, min_lr=1e-4)
    assert s(100 + 10 * 20) == 1e-4
    assert s(999) == 1e-4


def test_defaults_resolve_to_last_tenth_with_lr_over_ten():
    s = schedule(total=1000)
    assert s.decay_steps == 100 and s.decay_start == 901
    assert s(900) == ETA
    assert s(901 + 100) == pytest.approx(ETA / 10)  # half_life = D / log2(10)


@pytest.mark.parametrize("shape, quarter", [
    ("linear", 0.75),
    ("cosine", (1 + math.cos(math.pi / 4)) / 2),
    ("1-sqrt", 0.5),
])
def test_ramp_shapes(shape, quarter):
    lo = 1e-3
    s = schedule(decay=shape, decay_start=500, decay_steps=400, min_lr=lo)
    assert s(500) == pytest.approx(ETA)
    assert s(600) == pytest.approx(lo + (ETA - lo) * quarter)
    assert s(900) == pytest.approx(lo)
    assert s(1000) == pytest.approx(lo)


def test_cosine_kind_is_the_papers_form():
    s = schedule(kind="cosine", warmup_steps=0, total=1000)
    for step in (0, 250, 500, 1000):
        expected = 0.1 * ETA + 0.9 * ETA * (1 + math.cos(math.pi * step / 1000)) / 2
        assert s(step) == pytest.approx(expected)


def test_constant_and_stable_only():
    assert schedule(kind="constant", warmup_steps=10)(999) == ETA
    stable_only = schedule(decay_steps=0)
    assert stable_only(1000) == ETA and stable_only(10**6) == ETA


def test_decay_start_from_a_branch_ignores_total_steps():
    # A branch sets decay_start to its branch step and extends the run.
    s = schedule(total=5000, decay_start=300, half_life=100)
    assert s(299) == ETA and s(400) == pytest.approx(ETA / 2)


@pytest.mark.parametrize("fields", [
    dict(warmup_steps=20, decay="exp"), dict(warmup_steps=20, decay="linear"),
    dict(warmup_steps=20, decay="1-sqrt"), dict(kind="cosine", warmup_steps=20),
])
def test_non_increasing_after_warmup(fields):
    s = schedule(total=300, **fields)
    values = [s(i) for i in range(20, 301)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_bad_half_life_names_the_key():
    with pytest.raises(ValueError, match="schedule.half_life"):
        schedule(half_life=0)
