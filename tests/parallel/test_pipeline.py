"""Pipeline execution over gloo (PP2, PP4, PP2 x VPP2) equals one process: loss and every gradient."""
import os

import pytest
import torch
from torch import nn

from megacpm.parallel.context import ParallelContext
from megacpm.parallel.pipeline import PipelineSpec, run_pipeline
from tests.distributed import run_distributed

BLOCKS, MICRO, MB, SEQ, DIM = 4, 4, 2, 3, 8


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM))

    def forward(self, x):
        return x + self.f(x)  # ends with an add: its output is not saved for the backward


def blocks():
    torch.manual_seed(0)
    return [Residual() for _ in range(BLOCKS)]


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(MICRO, MB, SEQ, DIM, generator=g), torch.randn(MICRO, MB, SEQ, DIM, generator=g)


def loss_of(out, target):
    return ((out - target) ** 2).mean() / MICRO


def reference():
    model, (xs, ts) = blocks(), data()
    total = 0.0
    for x, t in zip(xs, ts):
        h = x
        for block in model:
            h = block(h)
        loss = loss_of(h, t)
        loss.backward()
        total += loss.item()
    return total, [[p.grad.clone() for p in b.parameters()] for b in model]


def _pipelined(vpp):
    ctx = ParallelContext.initialize(pp=int(os.environ["WORLD_SIZE"]), vpp=vpp, timeout_s=60)
    pp, rank = ctx.layout.pp, ctx.pp_rank
    model, (xs, ts) = blocks(), data()
    # Chunk c of rank r is the virtual stage c * pp + r; each virtual stage holds BLOCKS / (pp * vpp) blocks.
    per_stage = BLOCKS // (pp * vpp)
    mine = {}
    chunks = []
    for c in range(vpp):
        stage = c * pp + rank
        ids = list(range(stage * per_stage, (stage + 1) * per_stage))
        chunks.append(nn.Sequential(*[model[i] for i in ids]))
        mine.update({i: model[i] for i in ids})
    spec = PipelineSpec(pp=pp, rank=rank, vpp=vpp, group=ctx.group("pp"), group_ranks=ctx.group_ranks["pp"],
                        activation_shape=(MB, SEQ, DIM))
    chunk_fns = [lambda x, i, chunk=chunk: chunk(x) for chunk in chunks]
    total = run_pipeline(chunk_fns, spec, list(xs), lambda out, i: loss_of(out, ts[i]))
    grads = {i: [p.grad.clone() for p in b.parameters()] for i, b in mine.items()}
    return None if total is None else total.item(), grads


@pytest.mark.parametrize("world, vpp", [(2, 1), (4, 1), (2, 2)])
def test_pipeline_equals_one_process(world, vpp):
    expected_loss, expected_grads = reference()
    results = run_distributed(_pipelined, world, args=(vpp,))
    losses = [loss for loss, _ in results if loss is not None]
    assert len(losses) == 1 and losses[0] == pytest.approx(expected_loss, rel=1e-6)
    seen = set()
    for _, grads in results:
        for block, block_grads in grads.items():
            seen.add(block)
            for got, want in zip(block_grads, expected_grads[block]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert seen == set(range(BLOCKS))
