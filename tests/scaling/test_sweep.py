"""The sweep's grid, its per-run overrides and the best-LR analysis, on results made up here."""
import math

import pytest

from megacpm.config import load_config
from megacpm.scaling.optimum import interpolated_minimum
from megacpm.scaling.sweep import (PointResult, SweepError, SweepPoint, SweepSpec, best_learning_rates,
                                   optimum_spread, train_overrides)

LRS = [0.0025, 0.005, 0.01, 0.02, 0.04]


def result(param, width, lr, loss, status="ok"):
    return PointResult(param, width, lr, None, None, None, None, None, status, loss, loss, 10, 100, 1.0, "x")


def parabola_results(param, width, optimum, lrs=LRS):
    """Losses on a parabola in log LR with its vertex at ``optimum``."""
    return [result(param, width, lr, 3.0 + 0.2 * (math.log(lr) - math.log(optimum)) ** 2) for lr in lrs]


def test_interpolated_minimum_is_the_vertex():
    for optimum in (0.006, 0.01, 0.017):
        losses = [3.0 + 0.2 * (math.log(lr) - math.log(optimum)) ** 2 for lr in LRS]
        assert interpolated_minimum(LRS, losses) == pytest.approx(optimum, rel=1e-9)
    assert interpolated_minimum(LRS, [5, 4, 3, 2, 1]) is None  # the best is at the edge


def test_best_learning_rates_and_spread():
    results = (parabola_results("mup", 64, 0.011) + parabola_results("mup", 128, 0.013)
               + parabola_results("sp", 64, 0.018) + parabola_results("sp", 128, 0.0045))
    best = {(b.parametrization, b.width): b for b in best_learning_rates(results)}
    assert best["mup", 64].lr == 0.01 and best["mup", 128].lr == 0.01
    assert best["sp", 64].lr == 0.02 and best["sp", 128].lr == 0.005
    assert best["sp", 128].lr_interpolated == pytest.approx(0.0045)
    assert not any(b.edge for b in best.values())
    spread = optimum_spread(list(best.values()), LRS)
    assert spread["mup", ""].grid_steps == 0 and spread["mup", ""].factor == pytest.approx(13 / 11)
    assert spread["sp", ""].grid_steps == 2 and spread["sp", ""].factor == pytest.approx(0.018 / 0.0045)


def test_each_setting_of_the_other_axes_is_its_own_curve():
    """A sweep over init_std as well: the best LR is per (width, init_std), never across init stds."""
    def with_std(results, std):
        return [PointResult(**{**r.__dict__, "init_std": std}) for r in results]

    results = (with_std(parabola_results("mup", 64, 0.006), 0.05) + with_std(parabola_results("mup", 64, 0.025), 0.2)
               + with_std(parabola_results("mup", 128, 0.006), 0.05) + with_std(parabola_results("mup", 128, 0.025), 0.2))
    best = {(b.setting, b.width): b for b in best_learning_rates(results)}
    assert set(best) == {("init_std 0.05", 64), ("init_std 0.05", 128), ("init_std 0.2", 64), ("init_std 0.2", 128)}
    assert best["init_std 0.05", 64].lr == 0.005 and best["init_std 0.2", 128].lr == 0.02
    assert best["init_std 0.05", 64].lr_interpolated == pytest.approx(0.006)
    assert best["init_std 0.2", 128].lr_interpolated == pytest.approx(0.025)
    spread = optimum_spread(list(best.values()), LRS)
    assert spread["mup", "init_std 0.05"].grid_steps == 0 and spread["mup", "init_std 0.2"].grid_steps == 0


def test_diverged_runs_are_not_best_and_edges_are_flagged():
    results = parabola_results("sp", 64, 0.001)
    results[0] = result("sp", 64, LRS[0], None, status="diverged")
    (best,) = best_learning_rates(results)
    assert best.lr == LRS[1] and best.edge is False and best.lr_interpolated is None  # no parabola over a gap
    (edge,) = best_learning_rates(parabola_results("sp", 64, 0.001))
    assert edge.lr == LRS[0] and edge.edge
    (none,) = best_learning_rates([result("sp", 64, lr, None, "diverged") for lr in LRS])
    assert none.lr is None


def test_point_overrides():
    spec = SweepSpec(base="tiny", shapes=[(128, 3)], lrs=[0.01], steps=50, warmup_frac=0.1, decay_frac=0.2)
    base = load_config("tiny")
    point = SweepPoint("sp", 128, 0.01, depth=3, batch_size=4)
    args = dict(a[2:].split("=", 1) for a in train_overrides(spec, point, base, "/tmp/x"))
    assert args["model.use_mup"] == "False" and args["model.hidden_size"] == "128"
    assert args["model.num_attention_heads"] == "2" and args["model.intermediate_size"] == "320"
    assert args["model.num_hidden_layers"] == "3" and args["train.global_batch_size"] == "4"
    assert args["train.micro_batch_size"] == "4"  # gcd(4, the base's 8): it must divide the batch
    assert args["schedule.warmup_steps"] == "5" and args["schedule.decay_steps"] == "10"
    tokens_spec = SweepSpec(base="tiny", shapes=[(64, None)], lrs=[0.01], tokens=10_000, seq_len=100)
    tokens_args = train_overrides(tokens_spec, SweepPoint("mup", 64, 0.01, batch_size=4), base, "/tmp/x")
    assert "--train.steps=25" in tokens_args  # 10000 tokens / (4 x 100)
    assert "--schedule.kind=wsd" in tokens_args


@pytest.mark.parametrize("changes, message", [
    ({"shapes": [(100, None)]}, "multiple of head_dim"),
    ({"lrs": []}, "no lrs"),
    ({"parametrizations": ["ntk"]}, "parametrization must be"),
    ({"warmup_frac": 0.5, "decay_frac": 0.5}, "stable phase"),
])
def test_bad_grids(changes, message):
    spec = SweepSpec(**{"base": "tiny", "shapes": [(64, None)], "lrs": [0.01], **changes})
    with pytest.raises(SweepError, match=message):
        spec.points()
