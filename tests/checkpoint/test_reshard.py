"""Checkpoints are in model space: saved under one layout, loaded under another, training continues
with the single-process losses and gradient norms.

One chain of segments runs through a sequence of layouts: each segment loads the previous segment's
checkpoint (the first starts fresh), trains the next step under its own layout (the last segment two
steps) and saves, so every consecutive pair is a resharded resume. The loss and gradient norm of a
segment's first step check that the weights resharded; its update uses the resharded AdamW moments, so
the next segment's first step (or the last segment's second) checks the optimizer state too. The
reference is the uninterrupted run of the plain single-process model.

All segments run in the same four gloo processes (one spawn): a segment of world W uses ranks 0..W-1,
which join a fresh default process group (its own port) and leave it when the segment ends; the other
ranks wait for the next segment. Nothing but the checkpoint on disk passes from one segment to the next.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from megacpm.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from megacpm.model import MiniCPM
from megacpm.parallel.context import ParallelContext
from megacpm.train.train_module import TrainModule
from tests.distributed import free_port, run_distributed
from tests.tiny_run import LR, VOCAB, global_batches, make_config, reference_run

pytestmark = pytest.mark.slow
WORLD = 4

# (name, world, layout) in chain order; consecutive pairs are the transitions under test.
MAIN_CHAIN = [
    ("tp2xpp2", 4, dict(tp=2, pp=2)),
    ("one", 1, dict()),
    ("tp2xdp2", 4, dict(tp=2)),
    ("tp2sp-dp2zero1", 4, dict(tp=2, sp=True, zero1=True)),
    ("tp4", 4, dict(tp=4)),
    ("pp2xvpp2", 2, dict(pp=2, vpp=2)),
    ("dp4zero1", 4, dict(zero1=True)),
    ("pp2xvpp2", 2, dict(pp=2, vpp=2)),
]
# A padded vocabulary (61 over 4 ranks: 16, 16, 16, 13 real rows) reshards to another padding.
VOCAB61_CHAIN = [
    ("tp4", 4, dict(tp=4)),
    ("tp2xpp2", 4, dict(tp=2, pp=2)),
]
CHAINS = {"main": (VOCAB, MAIN_CHAIN), "vocab61": (61, VOCAB61_CHAIN)}
# (transition id, chain, index of its second segment)
TRANSITIONS = [
    ("tp2xpp2-to-one", "main", 1),
    ("one-to-tp2xdp2", "main", 2),
    ("tp2xdp2-to-tp2sp-dp2zero1", "main", 3),
    ("tp2sp-dp2zero1-to-tp4", "main", 4),
    ("tp4-to-pp2xvpp2", "main", 5),
    ("pp2xvpp2-to-dp4zero1", "main", 6),
    ("dp4zero1-to-pp2xvpp2", "main", 7),
    ("tp4-vocab61-to-tp2xpp2", "vocab61", 1),
]


def _train_segment(parallel, load_dir, save_dir, first, last, vocab=VOCAB):
    """Steps first..last under ``parallel`` (resuming from load_dir's latest checkpoint when first > 1),
    then save to save_dir. Returns [(loss, grad_norm)] of those steps."""
    cfg = make_config(vocab, **parallel)
    ctx = ParallelContext.initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp, timeout_s=120)
    step = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0 if first == 1 else 99))
    state = TrainerState()
    if first > 1:
        state = load_checkpoint(latest_checkpoint(load_dir), cfg, step)
        assert state.step == first - 1
    batches = global_batches(last, vocab)
    results = [step.step(batches[i - 1], LR) for i in range(first, last + 1)]
    results = [(r["loss"], r["grad_norm"]) for r in results]
    save_checkpoint(save_dir, cfg, step, TrainerState(step=last, optimizer_steps=last))
    return results


def _train_chains(segments):
    """Each segment (world, layout, load_dir, save_dir, first, last, vocab, port) on ranks < world, in
    order, each in its own default process group. Returns this rank's results per segment (None where
    the rank sat out)."""
    rank, out = int(os.environ["RANK"]), []
    for world, layout, load_dir, save_dir, first, last, vocab, port in segments:
        if rank >= world:
            out.append(None)
            continue
        os.environ.update(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), MASTER_PORT=str(port))
        try:
            out.append(_train_segment(layout, load_dir, save_dir, first, last, vocab))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return out


def _segment_steps(chain, index):
    """The 1-based steps segment ``index`` of a chain trains: one each, two for the last."""
    first = index + 1
    return first, first + (1 if index == len(chain) - 1 else 0)


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """{chain: (per-segment [(loss, norm)] of every rank that ran it, reference losses, norms, dirs)}."""
    root = tmp_path_factory.mktemp("reshard")
    segments, where, dirs = [], {}, {}
    for chain_name, (vocab, chain) in CHAINS.items():
        dirs[chain_name] = [root / f"{chain_name}-{i}-{name}" for i, (name, _, _) in enumerate(chain)]
        for i, (_, world, layout) in enumerate(chain):
            first, last = _segment_steps(chain, i)
            load_dir = dirs[chain_name][i - 1] if i else None
            where[chain_name, i] = len(segments)
            segments.append((world, layout, load_dir, dirs[chain_name][i], first, last, vocab, free_port()))
    per_rank = run_distributed(_train_chains, WORLD, args=(segments,), timeout=600)
    out = {}
    for chain_name, (vocab, chain) in CHAINS.items():
        losses, norms = reference_run(len(chain) + 1, vocab_size=vocab)
        results = [[r[where[chain_name, i]] for r in per_rank if r[where[chain_name, i]] is not None]
                   for i in range(len(chain))]
        out[chain_name] = (results, losses, norms, dirs[chain_name])
    return out


@pytest.mark.parametrize("name, chain_name, index", TRANSITIONS, ids=[t[0] for t in TRANSITIONS])
def test_resharded_resume_continues_the_run(chains, name, chain_name, index):
    results, losses, norms, _ = chains[chain_name]
    chain = CHAINS[chain_name][1]
    for i in (index - 1, index):  # the saving segment and the resuming one
        first, last = _segment_steps(chain, i)
        assert len(results[i]) == chain[i][1], (name, chain[i][0])
        for rank_results in results[i]:
            assert [loss for loss, _ in rank_results] == pytest.approx(losses[first - 1:last], rel=1e-4), \
                (name, chain[i][0])
            assert [norm for _, norm in rank_results] == pytest.approx(norms[first - 1:last], rel=1e-4), \
                (name, chain[i][0])
    if index + 1 < len(chain):  # the step after: trained with the optimizer state resharded here
        first, last = _segment_steps(chain, index + 1)
        for rank_results in results[index + 1]:
            assert [loss for loss, _ in rank_results] == pytest.approx(losses[first - 1:last], rel=1e-4), name
    else:
        assert len(results[index][0]) == 2  # the last segment's second step checks it instead


def test_sharded_checkpoint_holds_the_single_process_tensors(chains):
    """A tp2 x pp2 checkpoint stores every parameter under its single-process name and full shape."""
    _, _, _, dirs = chains["main"]
    assert MAIN_CHAIN[0][0] == "tp2xpp2"
    metadata = dcp.FileSystemReader(str(latest_checkpoint(dirs[0]) / "state")).read_metadata()
    saved = {key: tuple(meta.size) for key, meta in metadata.state_dict_metadata.items() if hasattr(meta, "size")}
    expected = {f"model.{name}": tuple(p.shape) for name, p in MiniCPM(make_config().model).named_parameters()}
    assert {k: v for k, v in saved.items() if k.startswith("model.")} == expected
    for moment in ("exp_avg", "exp_avg_sq"):
        assert {k: v for k, v in saved.items() if k.startswith(f"optim.{moment}.")} == {
            k.replace("model.", f"optim.{moment}.", 1): v for k, v in expected.items()}
