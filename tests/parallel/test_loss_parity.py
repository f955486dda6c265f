"""The acceptance test of the parallel engine: every layout gives the single-process losses.

The reference is one process with the plain MiniCPM, AdamW with muP groups and global-norm clipping
on the same global batches. Each layout runs as gloo processes with the same seed.
"""
import pytest
import torch

from megacpm.parallel.context import ParallelContext
from megacpm.train.train_module import TrainModule
from tests.distributed import run_distributed
from tests.tiny_run import LR, VOCAB, global_batches, make_config, reference_run

pytestmark = pytest.mark.slow
STEPS = 4


def _losses(parallel, vocab_size):
    cfg = make_config(vocab_size, **parallel)
    ctx = ParallelContext.initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp, timeout_s=120)
    step = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0))
    results = [step.step(batch, LR) for batch in global_batches(STEPS, vocab_size)]
    return [r["loss"] for r in results], [r["grad_norm"] for r in results]


def _layouts_losses(layouts):
    """Every (name, parallel, vocab) layout of one world size in this one spawned group."""
    return {name: _losses(parallel, vocab) for name, parallel, vocab in layouts}


LAYOUTS = [
    ("tp2", 2, dict(tp=2)),
    ("tp2-sp", 2, dict(tp=2, sp=True)),
    ("pp2", 2, dict(pp=2)),
    ("pp2-vpp2", 2, dict(pp=2, vpp=2)),
    ("dp2", 2, dict()),
    ("dp2-zero1", 2, dict(zero1=True)),
    ("dp4-zero1", 4, dict(zero1=True)),
    ("tp2-pp2-dp2", 8, dict(tp=2, pp=2)),
]
ODD_VOCAB = 61  # prime, like MiniCPM-2.4B's 122753: tp pads it to ceil(61 / tp) rows per rank
ODD_LAYOUTS = [("tp4", 4, dict(tp=4)), ("tp2-pp2-tied", 4, dict(tp=2, pp=2))]


@pytest.fixture(scope="module")
def parallel_results():
    """The losses and norms of every layout, one spawned group per world size."""
    by_world = {}
    for name, world, parallel in LAYOUTS:
        by_world.setdefault(world, []).append((name, parallel, VOCAB))
    for name, world, parallel in ODD_LAYOUTS:
        by_world.setdefault(world, []).append((name, parallel, ODD_VOCAB))
    results = {}
    for world, layouts in by_world.items():
        for rank_results in run_distributed(_layouts_losses, world, args=(layouts,), timeout=600):
            for name, value in rank_results.items():
                results.setdefault(name, []).append(value)
    return results


@pytest.fixture(scope="module")
def expected():
    losses, norms = reference_run(STEPS)
    # The updates must move the later losses by far more than the tolerance, or a layout that
    # never stepped its optimizer would pass.
    frozen, _ = reference_run(STEPS, lr=0.0)
    assert abs(losses[-1] - frozen[-1]) > 20 * 1e-4 * abs(frozen[-1])
    return losses, norms


@pytest.mark.parametrize("name, world, parallel", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_layout_matches_one_process(expected, parallel_results, name, world, parallel):
    losses, norms = expected
    results = parallel_results[name]
    assert len(results) == world
    for rank_losses, rank_norms in results:
        assert rank_losses == pytest.approx(losses, rel=1e-4), name
        # Clipping hides a wrongly scaled gradient from the losses (Adam is scale-invariant too):
        # the global norm itself must match.
        assert rank_norms == pytest.approx(norms, rel=1e-4), name


@pytest.mark.parametrize("name, world, parallel", ODD_LAYOUTS, ids=[layout[0] for layout in ODD_LAYOUTS])
def test_a_vocabulary_tp_does_not_divide_is_padded(parallel_results, name, world, parallel):
    losses, norms = reference_run(STEPS, vocab_size=ODD_VOCAB)
    for rank_losses, rank_norms in parallel_results[name]:
        assert rank_losses == pytest.approx(losses, rel=1e-4)
        assert rank_norms == pytest.approx(norms, rel=1e-4)
