"""Bucketed, overlapped data-parallel reduction equals one process on the whole global batch."""
import torch
from torch import nn

from megacpm.parallel.context import ParallelContext
from megacpm.optim.grad_buffer import GradBuffer
from tests.distributed import run_distributed

GLOBAL_BATCH, MICRO = 8, 2


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


def reference_grads():
    model, x, y = model_and_data()
    ((model(x) - y) ** 2).mean().backward()
    return [p.grad for p in model.parameters()]


def _dp_step(bucket_bytes):
    ctx = ParallelContext.initialize(timeout_s=60)
    dp, rank = ctx.world_size, ctx.rank
    model, x, y = model_and_data()
    launches = []
    buffer = GradBuffer(list(model.parameters()), ctx.group("dp"), bucket_bytes=bucket_bytes,
                        on_launch=lambda b: launches.append((b.index, in_backward[0])))
    in_backward = [False]
    local = slice(rank * GLOBAL_BATCH // dp, (rank + 1) * GLOBAL_BATCH // dp)
    micro_batches = list(zip(x[local].split(MICRO), y[local].split(MICRO)))
    for i, (xb, yb) in enumerate(micro_batches):
        buffer.sync_enabled = i == len(micro_batches) - 1
        loss = ((model(xb) - yb) ** 2).mean() / len(micro_batches)
        in_backward[0] = True
        loss.backward()
        in_backward[0] = False
        if i < len(micro_batches) - 1:
            assert not launches, "no communication on non-final micro-batches"
    buffer.finish()
    return [p.grad.clone() for p in model.parameters()], launches, len(buffer.buckets)


def test_dp2_buckets_equal_one_process():
    expected = reference_grads()
    # 200 bytes = 50 fp32 elements per bucket: three buckets for this model
    for grads, launches, n_buckets in run_distributed(_dp_step, 2, args=(200,)):
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert n_buckets >= 3
        # Buckets launch in order, as their gradients become ready, during the backward (overlap).
        assert [index for index, _ in launches] == list(range(n_buckets))
        assert all(during_backward for _, during_backward in launches)


def test_dp4_single_bucket_equals_one_process():
    expected = reference_grads()
    for grads, launches, n_buckets in run_distributed(_dp_step, 4, args=(10**9,)):
        assert n_buckets == 1
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
