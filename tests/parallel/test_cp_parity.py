"""Context parallelism's acceptance: every cp layout gives the single-process losses and gradient
norms at every step (within 1e-4), through the whole engine (TrainModule: the head-tail split of
the batch, the cp attention cores, RoPE at global positions, gradients reduced over dp x cp, the
loss as the global sum over the global token count).

The reference is tests.tiny_run's plain single-process MiniCPM and AdamW on the same batches. The
layouts of one world size share one spawned group (ParallelContext.initialize once per layout)."""
import pytest
import torch

from megacpm.parallel.context import ParallelContext
from megacpm.train.train_module import TrainModule
from tests.distributed import run_distributed
from tests.tiny_run import LR, global_batches, make_config, reference_run

pytestmark = pytest.mark.slow
STEPS, SEQ, EOD, BUCKETS = 5, 16, 0, 4

# (name, parallel settings, document mask) per world size
LAYOUTS = {
    2: [("cp2", dict(cp=2), False),
        ("cp2-ring", dict(cp=2, cp_attention="ring"), False),
        ("cp2-document-mask", dict(cp=2), True),
        ("cp2-ring-document-mask", dict(cp=2, cp_attention="ring"), True)],
    4: [("cp4", dict(cp=4), False),
        ("cp4-ring", dict(cp=4, cp_attention="ring"), False),
        ("cp2-tp2-sp", dict(cp=2, tp=2, sp=True), False),
        ("cp2-pp2", dict(cp=2, pp=2), False),
        ("cp2-pp2-vpp2", dict(cp=2, pp=2, vpp=2), False),
        ("cp2-dp2-zero1", dict(cp=2, zero1=True), False)],
}


def _train_and_evaluate(name, parallel, masked):
    """(losses, grad norms) of the steps, and the loss by position of an evaluation after them."""
    cfg = make_config(seq_len=SEQ, **parallel)
    cfg.train.eval_position_buckets = BUCKETS
    p = cfg.parallel
    ctx = ParallelContext.initialize(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, timeout_s=120)
    module = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0))
    batches = global_batches(STEPS + 1, document_eod=EOD if masked else None, seq_len=SEQ)
    steps = [module.step(batch, LR) for batch in batches[:STEPS]]
    by_position = {k: v for k, v in module.evaluate(batches[STEPS]).items() if k.startswith("loss_by_position/")}
    return [s["loss"] for s in steps], [s["grad_norm"] for s in steps], by_position


def _continue_across_layouts(stages, run_dir):
    """Each (parallel, steps) stage builds its layout, loads the previous stage's checkpoint, trains
    its steps and saves: (losses, grad norms) of every step of the run."""
    from megacpm.checkpoint.manager import TrainerState, load_checkpoint, save_checkpoint

    batches, done, losses, norms = global_batches(STEPS, seq_len=SEQ), 0, [], []
    for parallel, steps in stages:
        cfg = make_config(seq_len=SEQ, **parallel)
        cfg.run.dir = run_dir
        p = cfg.parallel
        ctx = ParallelContext.initialize(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, timeout_s=120)
        # After the first stage the weights come from the checkpoint: built from another seed, so a
        # load that missed a tensor shows.
        module = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0 if not done else 100))
        if done:
            load_checkpoint(f"{run_dir}/checkpoints/step_{done}", cfg, module)
        for batch in batches[done:done + steps]:
            metrics = module.step(batch, LR)
            losses.append(metrics["loss"])
            norms.append(metrics["grad_norm"])
        done += steps
        save_checkpoint(run_dir, cfg, module, TrainerState(step=done, optimizer_steps=module.optimizer_steps))
    return losses, norms


def _losses(layouts, stages=None, run_dir=None):
    results = {name: _train_and_evaluate(name, parallel, masked) for name, parallel, masked in layouts}
    if stages:
        results["moves"] = _continue_across_layouts(stages, run_dir)
    return results


# The checkpoint does not depend on cp: saved under dp 2, resumed under cp 2, saved again and
# resumed under dp 2 with ZeRO-1 (two processes throughout).
MOVES = [(dict(), 2), (dict(cp=2), 2), (dict(zero1=True), 1)]


@pytest.fixture(scope="module")
def references():
    """The plain model's losses and norms; the loss by position from the one-process engine (whose
    buckets tests/objectives/test_position_buckets.py checks against float64)."""
    return {masked: (*reference_run(STEPS, document_eod=EOD if masked else None, seq_len=SEQ),
                     _train_and_evaluate("one", {}, masked)[2])
            for masked in (False, True)}


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_cp_layouts_match_one_process(references, world, tmp_path):
    layouts = LAYOUTS[world]
    moves = MOVES if world == 2 else None
    per_rank = run_distributed(_losses, world, args=(layouts, moves, str(tmp_path / "run")), timeout=500)
    if moves:
        losses, norms, _ = references[False]
        for rank_results in per_rank:
            got_losses, got_norms = rank_results["moves"]
            assert got_losses == pytest.approx(losses, rel=1e-4), "dp2 -> cp2 -> dp2-zero1"
            assert got_norms == pytest.approx(norms, rel=1e-4), "dp2 -> cp2 -> dp2-zero1"
    for name, _, masked in layouts:
        losses, norms, by_position = references[masked]
        # Masked, no document passes 6 tokens: the buckets from position 8 are empty.
        assert len(by_position) == (2 if masked else BUCKETS), by_position
        for rank_results in per_rank:
            got_losses, got_norms, got_by_position = rank_results[name]
            assert got_losses == pytest.approx(losses, rel=1e-4), name
            assert got_norms == pytest.approx(norms, rel=1e-4), name
            assert sorted(got_by_position) == sorted(by_position), name
            for key, value in by_position.items():
                assert got_by_position[key] == pytest.approx(value, rel=1e-4), (name, key)


def test_the_document_mask_changes_the_reference():
    # Otherwise the masked layouts would pass without a mask: the same tokens without it.
    batches = global_batches(STEPS, document_eod=EOD, seq_len=SEQ)
    assert all(len(set(b.document_ids[0].tolist())) >= 3 for b in batches)
    cfg = make_config(seq_len=SEQ)
    plain, masked = [], []
    for keep_mask, losses in ((False, plain), (True, masked)):
        ctx = ParallelContext.single()
        module = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0))
        for b in batches:
            b = b if keep_mask else type(b)(input_ids=b.input_ids, labels=b.labels)
            losses.append(module.step(b, LR)["loss"])
    assert max(abs(a - b) / a for a, b in zip(plain, masked)) > 20 * 1e-4
