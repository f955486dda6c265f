"""The acceptance test of the parallel engine: every layout gives the single-process losses.

The reference is one process with the plain MiniCPM, AdamW with muP groups and global-norm clipping
on the same global batches. Each layout runs as gloo processes with the same seed.
"""
import pytest
import torch

from megacpm.config import Config
from megacpm.model import MiniCPM
from megacpm.optim import build_optimizer, clip_grad_norm_, set_lr
from megacpm.parallel.context import ParallelContext
from megacpm.train.parallel_step import ParallelStep
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow
STEPS, GLOBAL_BATCH, MICRO_BATCH, SEQ, LR = 4, 8, 2, 8, 0.1


def make_config(**parallel):
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.intermediate_size, m.num_hidden_layers = 32, 48, 4
    m.num_attention_heads, m.num_key_value_heads, m.vocab_size, m.dim_model_base = 4, 2, 64, 8
    cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.seq_len = GLOBAL_BATCH, MICRO_BATCH, SEQ
    cfg.optim.clip_grad = 0.5  # low enough to clip: the norm must be global for the losses to agree
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def global_batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 64, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def reference_losses(lr=LR):
    cfg = make_config()
    model = MiniCPM(cfg.model)
    model.init_weights(torch.Generator().manual_seed(0))
    optimizer = build_optimizer(model, cfg.model, cfg.optim)
    losses = []
    for samples in global_batches():
        total = 0.0
        for micro in samples.split(MICRO_BATCH):
            loss_sum, _ = model.loss(micro[:, :-1], micro[:, 1:])
            (loss_sum / samples[:, 1:].numel()).backward()
            total += float(loss_sum.detach())
        clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / samples[:, 1:].numel())
    return losses


def _parallel_losses(parallel):
    cfg = make_config(**parallel)
    ctx = ParallelContext.initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp, timeout_s=120)
    step = ParallelStep(cfg, ctx, generator=torch.Generator().manual_seed(0))
    return [step.step(samples, LR)[0] for samples in global_batches()]


LAYOUTS = [
    ("tp2", 2, dict(tp=2)),
    ("tp2-sp", 2, dict(tp=2, sp=True)),
    ("pp2", 2, dict(pp=2)),
    ("pp2-vpp2", 2, dict(pp=2, vpp=2)),
    ("dp2-zero1", 2, dict(zero1=True)),
    ("dp4-zero1", 4, dict(zero1=True)),
    ("tp2-pp2-dp2", 8, dict(tp=2, pp=2)),
]


@pytest.fixture(scope="module")
def expected():
    losses = reference_losses()
    # The updates must move the later losses by far more than the tolerance, or a layout that
    # never stepped its optimizer would pass.
    frozen = reference_losses(lr=0.0)
    assert abs(losses[-1] - frozen[-1]) > 20 * 1e-4 * abs(frozen[-1])
    return losses


@pytest.mark.parametrize("name, world, parallel", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_layout_matches_one_process(expected, name, world, parallel):
    results = run_distributed(_parallel_losses, world, args=(parallel,), timeout=400)
    for rank_losses in results:
        assert rank_losses == pytest.approx(expected, rel=1e-4), name
