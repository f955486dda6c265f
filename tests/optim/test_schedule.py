"""LR schedules at their landmarks, against numbers computed by hand from the recipe's formulas."""
import math

import pytest

from megacpm.config import ScheduleConfig, load_config, preset_names
from megacpm.optim import LRSchedule

ETA = 0.01


def schedule(total=1000, **fields):
    return LRSchedule.from_config(ScheduleConfig(**fields), ETA, total)


def test_wsd_exp_landmarks():
    s = schedule(warmup_steps=100, decay_start=800, half_life=50, min_lr=1e-4)
    assert s(50) == pytest.approx(ETA / 2)  # mid-warmup
    assert s(25) == pytest.approx(ETA / 4)
    assert s(100) == s(400) == s(799) == ETA  # stable
    assert s(800) == ETA  # t = 0
    assert s(850) == pytest.approx(ETA / 2)  # one half-life into the decay
    assert s(900) == pytest.approx(ETA / 4)
    assert s(1000) == pytest.approx(ETA / 16)  # 4 half-lives, still above the floor


def test_wsd_exp_floor_holds():
    s = schedule(decay_start=100, half_life=10, min_lr=1e-4)
    # 0.01 * 0.5 ** (t / 10) < 1e-4 once t > 10 * log2(100) = 66.4
    assert s(166) == pytest.approx(ETA * 0.5 ** 6.6)
    assert s(167) == s(300) == s(999) == 1e-4


def test_defaults_resolve_to_last_tenth_with_lr_over_ten():
    s = schedule(total=1000)
    assert s.describe() == {"kind": "wsd", "peak_lr": ETA, "total_steps": 1000, "warmup_steps": 0,
                            "decay": "exp", "decay_start": 901, "decay_steps": 100,
                            "half_life": pytest.approx(100 / 3.321928), "min_lr": 0.0}
    assert s(1) == s(900) == ETA
    assert s(901 + 100) == pytest.approx(ETA / 10)  # the paper's 1e-2 -> 1e-3
    assert s(1000) == pytest.approx(ETA * 10 ** -0.99)


@pytest.mark.parametrize("shape, quarter, half", [
    ("linear", 0.75, 0.5),
    ("cosine", (1 + math.cos(math.pi / 4)) / 2, 0.5),
    ("1-sqrt", 0.5, 1 - math.sqrt(0.5)),
])
def test_ramp_shapes(shape, quarter, half):
    lo = 1e-3
    s = schedule(decay=shape, decay_start=500, decay_steps=400, min_lr=lo)
    assert s(499) == s(500) == pytest.approx(ETA)
    assert s(600) == pytest.approx(lo + (ETA - lo) * quarter)  # t = D / 4
    assert s(700) == pytest.approx(lo + (ETA - lo) * half)  # t = D / 2
    assert s(900) == pytest.approx(lo)  # t = D
    assert s(1000) == pytest.approx(lo)


def test_one_minus_sqrt_at_a_quarter_by_hand():
    s = schedule(decay="1-sqrt", decay_start=101, decay_steps=100, min_lr=0.002)
    assert s(126) == pytest.approx(0.01 - (0.01 - 0.002) * 0.5)  # 0.006


def test_cosine_kind_is_the_papers_form():
    s = schedule(kind="cosine", warmup_steps=0, total=1000)
    for step in (1, 250, 500, 999, 1000):
        expected = 0.1 * ETA + 0.9 * ETA * (1 + math.cos(math.pi * step / 1000)) / 2
        assert s(step) == pytest.approx(expected)
    assert s(1000) == pytest.approx(0.1 * ETA)
    assert s(1500) == pytest.approx(0.1 * ETA)  # clamped at train.steps


def test_cosine_kind_after_warmup():
    s = schedule(kind="cosine", warmup_steps=100, total=500, min_lr=0.0)
    assert s(50) == pytest.approx(ETA / 2)
    assert s(100) == pytest.approx(ETA)
    assert s(300) == pytest.approx(ETA / 2)  # halfway through 400 cosine steps
    assert s(500) == pytest.approx(0.0)
    assert s.describe()["decay_start"] == 100 and s.describe()["decay_steps"] == 400


def test_constant_and_stable_only():
    constant = schedule(kind="constant", warmup_steps=10)
    assert constant(5) == pytest.approx(ETA / 2) and constant(10) == constant(999) == ETA
    stable_only = schedule(decay_steps=0)
    assert stable_only(1000) == ETA and stable_only(10**6) == ETA


def test_decay_start_is_independent_of_total_steps():
    # A branch sets decay_start to its branch step and extends the run.
    s = schedule(total=5000, decay_start=300, half_life=100)
    assert s(299) == ETA and s(400) == pytest.approx(ETA / 2)
    beyond = schedule(total=100, decay_start=500, decay_steps=50)  # never decays within the run
    assert beyond(100) == ETA and beyond(550) == pytest.approx(ETA / 10)


@pytest.mark.parametrize("fields", [
    dict(warmup_steps=20, decay="exp"), dict(warmup_steps=20, decay="linear"),
    dict(warmup_steps=20, decay="cosine"), dict(warmup_steps=20, decay="1-sqrt"),
    dict(warmup_steps=20, decay="exp", min_lr=1e-3, half_life=5), dict(kind="cosine", warmup_steps=20),
])
def test_non_increasing_after_warmup(fields):
    s = schedule(total=300, **fields)
    values = [s(i) for i in range(20, 400)]
    assert values[0] == ETA and values[-1] < ETA
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("fields, key", [
    (dict(half_life=0), "half_life"),
    (dict(kind="step"), "kind"),
    (dict(decay="poly"), "decay"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(min_lr=0.02), "min_lr"),
    (dict(min_lr=-1e-4), "min_lr"),
    (dict(decay_steps=-5), "decay_steps"),
    (dict(decay_steps=0, decay_start=500), "decay_steps"),  # "stable only" yet a decay start
    (dict(warmup_steps=100, decay_start=50), "decay_start"),
])
def test_inconsistent_settings_name_the_key(fields, key):
    with pytest.raises(ValueError, match=rf"^schedule\.{key}:"):
        schedule(**fields)


def test_a_run_shorter_than_the_presets_decay_still_works():
    # tiny's warmup 20 / decay_steps 40 with --train.steps=16 (a smoke test): all warmup.
    s = schedule(total=16, warmup_steps=20, decay_steps=40, half_life=10)
    assert s.decay_start == 20 and s(16) == pytest.approx(ETA * 16 / 20)
    assert s(20) == ETA and s(30) == pytest.approx(ETA / 2)  # the decay follows the warmup
    # Default decay overlapping the warmup: it starts when the warmup ends.
    s = schedule(total=100, warmup_steps=95, decay_steps=10, half_life=5)
    assert s.decay_start == 95 and s(95) == ETA and s(100) == pytest.approx(ETA / 2)
    cosine = schedule(kind="cosine", total=16, warmup_steps=20)
    assert cosine(16) == pytest.approx(ETA * 16 / 20) and cosine(20) == pytest.approx(0.1 * ETA)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_resolves(name):
    cfg = load_config(name)
    s = LRSchedule.from_config(cfg.schedule, cfg.optim.lr, cfg.train.steps)
    assert s(cfg.train.steps) <= cfg.optim.lr


def test_the_schedule_is_built_from_the_configs_landmarks():
    from megacpm.config import resolve_schedule

    cfg = ScheduleConfig(warmup_steps=30, decay="linear", decay_steps=200)
    landmarks = resolve_schedule(cfg, ETA, 1000)
    s = LRSchedule.from_landmarks(landmarks)
    assert s.describe() == landmarks.describe() == LRSchedule.from_config(cfg, ETA, 1000).describe()
    assert s(15) == pytest.approx(ETA / 2) and s(801 + 200) == pytest.approx(0.0)  # t = decay_steps
