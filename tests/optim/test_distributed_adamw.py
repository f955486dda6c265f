"""ZeRO-1 over 2 and 4 gloo ranks equals torch.optim.AdamW in one process on the whole batch."""
import pytest
import torch
from torch import nn

from megacpm.parallel.context import ParallelContext
from megacpm.optim.grad_buffer import GradBuffer
from megacpm.optim.distributed_adamw import DistributedAdamW
from tests.distributed import run_distributed

BATCH, STEPS, LR = 8, 3, 0.05


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(STEPS, BATCH, 5, generator=g), torch.randn(STEPS, BATCH, 3, generator=g)


def groups(model):
    # muP-like: matrices at lr/4 with weight decay, vectors at lr without.
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim == 1]
    return [{"params": matrices, "lr_scale": 0.25, "weight_decay": 0.1},
            {"params": vectors, "lr_scale": 1.0, "weight_decay": 0.0}]


def reference_params():
    model, xs, ys = model_and_data()
    groups_ = groups(model)
    opt = torch.optim.AdamW([{"params": g["params"], "lr": LR * g["lr_scale"], "weight_decay": g["weight_decay"]}
                             for g in groups_], betas=(0.9, 0.95), eps=1e-8)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _zero_run(bucket_bytes):
    ctx = ParallelContext.initialize(timeout_s=60)
    model, xs, ys = model_and_data()
    buffer = GradBuffer(list(model.parameters()), ctx.group("dp"), bucket_bytes=bucket_bytes, shard_buckets=True)
    opt = DistributedAdamW(buffer, groups(model), betas=(0.9, 0.95), eps=1e-8)
    dp, rank = ctx.world_size, ctx.rank
    local = slice(rank * BATCH // dp, (rank + 1) * BATCH // dp)
    for x, y in zip(xs, ys):
        buffer.reset()
        ((model(x[local]) - y[local]) ** 2).mean().backward()
        buffer.finish()
        opt.step(LR)
    return [p.detach().clone() for p in model.parameters()], opt.master.numel(), buffer.buffer.numel()


@pytest.mark.parametrize("dp, bucket_bytes", [(2, 40), (4, 10**6)])
def test_zero1_equals_adamw(dp, bucket_bytes):
    expected = reference_params()
    results = run_distributed(_zero_run, dp, args=(bucket_bytes,))
    for params, shard_elems, buffer_elems in results:
        for got, want in zip(params, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert shard_elems <= buffer_elems // dp  # each rank keeps only its slice of the state
    assert sum(r[1] for r in results) == sum(p.numel() for p in expected)


def test_bf16_parameters_train_on_fp32_masters():
    """bf16 weights, fp32 masters: the masters follow fp32 AdamW exactly, even with updates far below
    bf16's resolution, and the weights are the masters rounded to bf16."""
    steps, lr = 20, 1e-5  # each update ~1e-5: invisible to bf16 weights near 0.3 (spacing ~2e-3)
    reference, xs, ys = model_and_data()
    model, _, _ = model_and_data()
    model.to(torch.bfloat16)
    with torch.no_grad():  # the reference starts from the same (bf16-rounded) weights
        for ref, p in zip(reference.parameters(), model.parameters()):
            ref.copy_(p.float())
    ref_opt = torch.optim.AdamW([{"params": g["params"], "lr": lr * g["lr_scale"], "weight_decay": g["weight_decay"]}
                                 for g in groups(reference)], betas=(0.9, 0.95), eps=1e-8)
    buffer = GradBuffer(list(model.parameters()), None)
    opt = DistributedAdamW(buffer, groups(model), betas=(0.9, 0.95), eps=1e-8)
    start = [p.detach().clone() for p in model.parameters()]
    for i in range(steps):
        x, y = xs[i % STEPS], ys[i % STEPS]
        buffer.reset()
        ((model(x.bfloat16()) - y.bfloat16()).float() ** 2).mean().backward()
        buffer.finish()
        grads = [p.main_grad.clone() for p in model.parameters()]
        opt.step(lr)
        for ref, grad in zip(reference.parameters(), grads):  # the same gradients, in fp32
            ref.grad = grad
        ref_opt.step()
    state = opt.full_state()
    for ref, p, p0 in zip(reference.parameters(), model.parameters(), start):
        assert p.dtype == torch.bfloat16 and state[id(p)]["master"].dtype == torch.float32
        torch.testing.assert_close(state[id(p)]["master"], ref.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(p.detach(), state[id(p)]["master"].to(torch.bfloat16))
        assert not torch.equal(state[id(p)]["master"], p0.float())  # the masters moved
