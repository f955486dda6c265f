"""Checkpoints are in model space: saved under one layout, loaded under another, training continues
with the single-process losses and gradient norms.

Each case trains steps 1-2 under layout A (gloo processes), saves, and trains steps 3-4 under layout
B from that checkpoint; the reference is four uninterrupted steps of the plain single-process model.
"""
import pytest
import torch
import torch.distributed.checkpoint as dcp

from megacpm.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from megacpm.model import MiniCPM
from megacpm.parallel.context import ParallelContext
from megacpm.train.train_module import TrainModule
from tests.distributed import run_distributed
from tests.tiny_run import LR, VOCAB, global_batches, make_config, reference_run

pytestmark = pytest.mark.slow
STEPS, SAVED_AT = 4, 2


def _train_segment(parallel, run_dir, first, last, vocab=VOCAB):
    """Steps first..last under ``parallel`` (resuming from run_dir's latest checkpoint when first > 1),
    then save. Returns [(loss, grad_norm)] of those steps."""
    cfg = make_config(vocab, **parallel)
    ctx = ParallelContext.initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp, timeout_s=120)
    step = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0 if first == 1 else 99))
    state = TrainerState()
    if first > 1:
        state = load_checkpoint(latest_checkpoint(run_dir), cfg, step)
        assert state.step == first - 1
    batches = global_batches(STEPS, vocab)
    results = [step.step(batches[i - 1], LR) for i in range(first, last + 1)]
    results = [(r["loss"], r["grad_norm"]) for r in results]
    save_checkpoint(run_dir, cfg, step, TrainerState(step=last, optimizer_steps=last))
    return results


# (name, world A, layout A, world B, layout B, vocabulary)
CASES = [
    ("tp2xpp2-to-one", 4, dict(tp=2, pp=2), 1, dict(), VOCAB),
    ("one-to-tp2xdp2", 1, dict(), 4, dict(tp=2), VOCAB),
    ("pp2xvpp2-to-dp4zero1", 2, dict(pp=2, vpp=2), 4, dict(zero1=True), VOCAB),
    ("dp4zero1-to-pp2xvpp2", 4, dict(zero1=True), 2, dict(pp=2, vpp=2), VOCAB),
    ("tp2sp-dp2zero1-to-tp4", 4, dict(tp=2, sp=True, zero1=True), 4, dict(tp=4), VOCAB),
    # A padded vocabulary (61 over 4 ranks: 16, 16, 16, 13 real rows) reshards to another padding.
    ("tp4-vocab61-to-tp2xpp2", 4, dict(tp=4), 4, dict(tp=2, pp=2), 61),
]


@pytest.mark.parametrize("name, world_a, layout_a, world_b, layout_b, vocab", CASES, ids=[c[0] for c in CASES])
def test_resharded_resume_continues_the_run(tmp_path, name, world_a, layout_a, world_b, layout_b, vocab):
    losses, norms = reference_run(STEPS, vocab_size=vocab)
    before = run_distributed(_train_segment, world_a, args=(layout_a, tmp_path, 1, SAVED_AT, vocab), timeout=300)
    after = run_distributed(_train_segment, world_b, args=(layout_b, tmp_path, SAVED_AT + 1, STEPS, vocab),
                            timeout=300)
    for rank_results in before:
        assert [loss for loss, _ in rank_results] == pytest.approx(losses[:SAVED_AT], rel=1e-4)
    for rank_results in after:
        assert [loss for loss, _ in rank_results] == pytest.approx(losses[SAVED_AT:], rel=1e-4), name
        assert [norm for _, norm in rank_results] == pytest.approx(norms[SAVED_AT:], rel=1e-4), name


def test_sharded_checkpoint_holds_the_single_process_tensors(tmp_path):
    """A tp2 x pp2 checkpoint stores every parameter under its single-process name and full shape."""
    run_distributed(_train_segment, 4, args=(dict(tp=2, pp=2), tmp_path, 1, 1), timeout=300)
    metadata = dcp.FileSystemReader(str(latest_checkpoint(tmp_path) / "state")).read_metadata()
    saved = {key: tuple(meta.size) for key, meta in metadata.state_dict_metadata.items() if hasattr(meta, "size")}
    expected = {f"model.{name}": tuple(p.shape) for name, p in MiniCPM(make_config().model).named_parameters()}
    assert {k: v for k, v in saved.items() if k.startswith("model.")} == expected
    for moment in ("exp_avg", "exp_avg_sq"):
        assert {k: v for k, v in saved.items() if k.startswith(f"optim.{moment}.")} == {
            k.replace("model.", f"optim.{moment}.", 1): v for k, v in expected.items()}
