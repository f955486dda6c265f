"""The acceptance test of the parallel engine: every layout gives the single-process losses.

The reference is one process with the plain MiniCPM, AdamW with muP groups and global-norm clipping
on the same global batches. Each layout runs as gloo processes with the same seed.
"""
import pytest
import torch

from megacpm.parallel.context import ParallelContext
from megacpm.train.train_module import TrainModule
from tests.distributed import run_distributed
from tests.tiny_run import LR, global_batches, make_config, reference_run

pytestmark = pytest.mark.slow
STEPS = 4


def _parallel_losses(parallel):
    cfg = make_config(**parallel)
    ctx = ParallelContext.initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp, timeout_s=120)
    step = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0))
    results = [step.step(batch, LR) for batch in global_batches(STEPS)]
    return [r["loss"] for r in results], [r["grad_norm"] for r in results]


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


@pytest.fixture(scope="module")
def expected():
    losses, norms = reference_run(STEPS)
    # The updates must move the later losses by far more than the tolerance, or a layout that
    # never stepped its optimizer would pass.
    frozen, _ = reference_run(STEPS, lr=0.0)
    assert abs(losses[-1] - frozen[-1]) > 20 * 1e-4 * abs(frozen[-1])
    return losses, norms


@pytest.mark.parametrize("name, world, parallel", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_layout_matches_one_process(expected, name, world, parallel):
    losses, norms = expected
    results = run_distributed(_parallel_losses, world, args=(parallel,), timeout=400)
    for rank_losses, rank_norms in results:
        assert rank_losses == pytest.approx(losses, rel=1e-4), name
        # Clipping hides a wrongly scaled gradient from the losses (Adam is scale-invariant too):
        # the global norm itself must match.
        assert rank_norms == pytest.approx(norms, rel=1e-4), name


ODD_VOCAB = 61  # prime, like MiniCPM-2.4B's 122753: tp pads it to ceil(61 / tp) rows per rank


def _odd_vocab_losses(parallel):
    cfg = make_config(ODD_VOCAB, **parallel)
    ctx = ParallelContext.initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, timeout_s=120)
    step = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0))
    results = [step.step(batch, LR) for batch in global_batches(STEPS, ODD_VOCAB)]
    return [r["loss"] for r in results], [r["grad_norm"] for r in results]


@pytest.mark.parametrize("world, parallel", [(4, dict(tp=4)), (4, dict(tp=2, pp=2))], ids=["tp4", "tp2-pp2-tied"])
def test_a_vocabulary_tp_does_not_divide_is_padded(world, parallel):
    losses, norms = reference_run(STEPS, vocab_size=ODD_VOCAB)
    for rank_losses, rank_norms in run_distributed(_odd_vocab_losses, world, args=(parallel,), timeout=400):
        assert rank_losses == pytest.approx(losses, rel=1e-4)
        assert rank_norms == pytest.approx(norms, rel=1e-4)

