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
    ctx = ParallelContext.initialize(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep, timeout_s=120)
    module = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0))
    metrics = [module.step(batch, LR) for batch in global_batches(STEPS)]
    routers = {index: (mlp.gate.weight.detach().clone(), mlp.router_bias.clone())
               for index, mlp in module.model.moe_layers().items()}
    # This rank holds its EP share of the experts (and its TP slice of each).
    w1 = next(iter(module.model.moe_layers().values())).w1
    expected_shape = (cfg.model.num_experts // p.ep, cfg.model.intermediate_size // p.tp, cfg.model.hidden_size)
    assert tuple(w1.shape) == expected_shape, (tuple(w1.shape), expected_shape)
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
          ("pp2-vpp2", dict(pp=2, vpp=2)), ("dp2-zero1", dict(zero1=True)), ("ep2", dict(ep=2)),
          ("ep2-zero1", dict(ep=2, zero1=True)), ("cp2", dict(cp=2))]


def test_two_process_layouts_match_one_process(expected):
    results = run_distributed(_run_layouts, 2, args=([p for _, p in WORLD2],), timeout=600)
    for rank_results in results:
        for (name, _), result in zip(WORLD2, rank_results):
            _check(name, result, expected)


def _run_continuing(stages, run_dir):
    """Each (parallel, steps) stage builds its layout, loads the previous stage's checkpoint (any
    layout), trains its steps and saves: a run moving across layouts. The metrics of every step."""
    from megacpm.checkpoint.manager import TrainerState, load_checkpoint, save_checkpoint

    batches, done, metrics, routers = global_batches(STEPS), 0, [], {}
    for parallel, steps in stages:
        cfg = make_moe_config(**parallel)
        p = cfg.parallel
        ctx = ParallelContext.initialize(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep, timeout_s=120)
        # After the first stage the weights come from the checkpoint: built from another seed, so a
        # load that missed a tensor shows.
        module = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0 if not done else 100))
        if done:
            load_checkpoint(f"{run_dir}/checkpoints/step_{done}", cfg, module)
        for batch in batches[done:done + steps]:
            metrics.append({key: value for key, value in module.step(batch, LR).items() if key in TRACKED})
        done += steps
        save_checkpoint(run_dir, cfg, module, TrainerState(step=done, optimizer_steps=module.optimizer_steps))
        routers = {index: (mlp.gate.weight.detach().clone(), mlp.router_bias.clone())
                   for index, mlp in module.model.moe_layers().items()}
    return metrics, routers


def _run_four(layouts, stages, run_dir):
    return [_run(parallel) for parallel in layouts], _run_continuing(stages, run_dir)


WORLD4 = [("ep2-tp2", dict(ep=2, tp=2)), ("ep2-pp2", dict(ep=2, pp=2)), ("ep4-dp4-zero1", dict(ep=4, zero1=True)),
          ("cp2-ep2", dict(cp=2, ep=2))]
# Saved under EP2 x TP2, resumed under EP4 with ZeRO-1, saved again and resumed under EP2 x PP2.
MOVES = [(dict(ep=2, tp=2), 1), (dict(ep=4, zero1=True), 1), (dict(ep=2, pp=2), 1)]


def test_four_process_expert_parallel_layouts_match_one_process_and_resume_across_layouts(expected, tmp_path):
    results = run_distributed(_run_four, 4, args=([p for _, p in WORLD4], MOVES, str(tmp_path / "run")),
                              timeout=900)
    for layouts, moved in results:
        for (name, _), result in zip(WORLD4, layouts):
            _check(name, result, expected)
        _check("ep2-tp2 -> ep4-zero1 -> ep2-pp2", moved, expected)


def test_eight_processes_tp2_pp2_ep2_match_one_process(expected):
    for rank_results in run_distributed(_run_layouts, 8, args=([dict(tp=2, pp=2, ep=2)],), timeout=900):
        _check("tp2-pp2-ep2", rank_results[0], expected)
