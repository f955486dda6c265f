"""MiniCPM-MoE under every layout gives the one-process run: losses, global gradient norms, the
routing metrics (the load-balancing and z losses, expert loads), the routers' weights and the
router biases of auxiliary-loss-free balancing after the steps.

The auxiliary losses are counted once per token over micro-batches, data-parallel ranks, TP/SP
ranks and pipeline stages (megacpm.model.moe_step); their coefficients are large here, so a
gradient counted twice or not at all moves the losses and the norms far past the tolerance. The
one-process run's aux loss itself is checked against an fp64 formula in
tests/train/test_moe_training.py. Layouts of one world size share the worker processes.
"""
import pytest
import torch

from megacpm.parallel.context import ParallelContext
from megacpm.train.train_module import TrainModule
from tests.distributed import run_distributed
from tests.tiny_run import LR, global_batches, make_moe_config

pytestmark = pytest.mark.slow
STEPS = 3
TRACKED = ("loss", "grad_norm", "moe/aux_loss", "moe/z_loss", "moe/max_load")


def _run(parallel):
    cfg = make_moe_config(**parallel)
    p = cfg.parallel
    ctx = ParallelContext.initialize(tp=p.tp, pp=p.pp, vpp=p.vpp, ep=p.ep, timeout_s=120)
    module = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0))
    metrics = [module.step(batch, LR) for batch in global_batches(STEPS)]
    routers = {index: (mlp.gate.weight.detach().clone(), mlp.router_bias.clone())
               for index, mlp in module.model.moe_layers().items()}
    return [{key: m[key] for key in TRACKED} for m in metrics], routers


def _run_layouts(layouts):
    return [_run(parallel) for parallel in layouts]


@pytest.fixture(scope="module")
def expected():
    metrics, routers = _run({})
    # The balancing must be doing something the layouts could get wrong.
    assert any(bias.abs().sum() > 0 for _, bias in routers.values())
    return metrics, routers


def _check(name, result, expected):
    metrics, routers = result
    want_metrics, want_routers = expected
    for step, (got, want) in enumerate(zip(metrics, want_metrics), 1):
        for key in TRACKED:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (name, step, key)
    assert routers, name
    for index, (gate, bias) in routers.items():
        torch.testing.assert_close(gate, want_routers[index][0], rtol=1e-4, atol=1e-6, msg=f"{name} layer {index}")
        torch.testing.assert_close(bias, want_routers[index][1], rtol=0, atol=1e-6, msg=f"{name} layer {index}")


WORLD2 = [("tp2", dict(tp=2)), ("tp2-sp", dict(tp=2, sp=True)), ("pp2", dict(pp=2)),
          ("pp2-vpp2", dict(pp=2, vpp=2)), ("dp2-zero1", dict(zero1=True))]


def test_two_process_layouts_match_one_process(expected):
    results = run_distributed(_run_layouts, 2, args=([p for _, p in WORLD2],), timeout=600)
    for rank_results in results:
        for (name, _), result in zip(WORLD2, rank_results):
            _check(name, result, expected)
