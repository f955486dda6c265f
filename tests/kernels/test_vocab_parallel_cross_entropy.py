"""vocab_parallel_cross_entropy over 2 and 4 gloo processes equals the one-process cross entropy on the
concatenated logits: the loss on every rank, and each rank's slice of the logits' gradient. impl "torch"
and "triton" (the children inherit TRITON_INTERPRET=1 from this process)."""
import os
from datetime import timedelta

import pytest
import torch

from megacpm.kernels import cross_entropy, vocab_parallel_cross_entropy
from megacpm.parallel.local_launch import run_distributed
from references import cross_entropy_formula as formula, loss_and_grad
from tolerance import assert_close_to_reference, dtype_atol

# (impl, dtype, rows, vocab, scale, reduction, ignored rows, all ignored)
CASES = [
    (impl, dtype, 13, 1000, 1 / 9, reduction, (0, 4), False)
    for impl in ("torch", "triton") for dtype in ("float32", "bfloat16") for reduction in ("mean", "sum", "none")
] + [
    (impl, "float32", 3, 28, 2.5, "mean", (), False) for impl in ("torch", "triton")
] + [
    (impl, "float32", 3, 28, 1.0, reduction, (), True) for impl in ("torch", "triton") for reduction in ("mean", "sum")
]


def make_case(rows, vocab, dtype, ignored, all_ignored, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(getattr(torch, dtype))
    labels = torch.randint(0, vocab, (rows,), generator=g)
    for i in ignored:
        labels[i] = -100
    if all_ignored:
        labels[:] = -100
    grad_out = torch.randn(rows, generator=g)
    return logits, labels, grad_out


def worker(cases):
    import torch.distributed as dist

    assert os.environ.get("TRITON_INTERPRET") == "1"  # inherited: the triton cases run interpreted
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for seed, (impl, dtype, rows, vocab, scale, reduction, ignored, all_ignored) in enumerate(cases):
        logits, labels, grad_out = make_case(rows, vocab, dtype, ignored, all_ignored, seed)
        part = vocab // world
        shard = logits[:, rank * part:(rank + 1) * part].clone().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(shard, labels, None, logit_scale=scale, reduction=reduction, impl=impl)
        loss.backward(grad_out if reduction == "none" else torch.tensor(1.7))
        # plain lists: tensors would travel through shared memory that the finished child takes away
        out.append((loss.detach().tolist(), shard.grad.float().tolist()))
    # Unequal slices are refused on every rank (found by the max all-reduce: no extra collective, no hang).
    logits, labels, _ = make_case(3, 4 * world + 1, "float32", (), False, 99)
    bounds = [0, 5] + [5 + 4 * i for i in range(1, world)]
    shard = logits[:, bounds[rank]:bounds[rank + 1]]
    try:
        vocab_parallel_cross_entropy(shard, labels, None, impl="torch")
        refused = False
    except ValueError:
        refused = True
    return out, refused


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_equals_one_process_cross_entropy(world):
    results = run_distributed(worker, world, args=(CASES,), timeout=300)
    for rank_result in results:
        assert rank_result[1], "unequal vocabulary slices were not refused"
    for seed, case in enumerate(CASES):
        impl, dtype, rows, vocab, scale, reduction, ignored, all_ignored = case
        logits, labels, grad_out = make_case(rows, vocab, dtype, ignored, all_ignored, seed)
        g = grad_out if reduction == "none" else torch.tensor(1.7)
        one, one_grad = loss_and_grad(
            lambda x: cross_entropy(x, labels, logit_scale=scale, reduction=reduction, impl="torch"), logits, g)
        ref, ref_grad = loss_and_grad(lambda x: formula(x, labels, scale, reduction=reduction), logits.double(), g)
        base, base_grad = loss_and_grad(lambda x: formula(x, labels, scale, reduction=reduction), logits, g)
        losses = [torch.tensor(r[0][seed][0], dtype=torch.float32) for r in results]
        grad = torch.cat([torch.tensor(r[0][seed][1]) for r in results], dim=-1).to(logits.dtype)
        label = f"world {world} case {case}"
        assert grad.dtype == logits.dtype and grad.shape == logits.shape
        for loss in losses:
            assert loss.dtype == torch.float32
            # Two fp32 algorithms (one-pass lse against the combined per-slice max / sum-exp) over a
            # 1000-wide vocabulary differ by tens of ulps, with the summation order the CPU's SIMD width
            # picks; the fp64 check below is the accuracy bound.
            torch.testing.assert_close(loss, one, rtol=1e-5, atol=1e-5, msg=lambda m: f"{label}: {m}")
        torch.testing.assert_close(grad.float(), one_grad.float(), msg=lambda m: f"{label}: {m}",
                                   **({} if dtype == "float32" else dict(rtol=2 ** -7, atol=1e-6)))
        if all_ignored:
            assert float(losses[0].abs().max()) == 0.0 and float(grad.abs().max()) == 0.0
            continue
        lscale = max(1.0, ref.abs().max().item())
        assert_close_to_reference(losses[0], ref, base, 2.0, 4 * dtype_atol(torch.float32, lscale), name=label)
        gscale = max(1e-3, ref_grad.abs().max().item())
        assert_close_to_reference(grad, ref_grad, base_grad, 2.0, 4 * dtype_atol(logits.dtype, gscale), name=label)


def test_single_process_group_is_plain_cross_entropy():
    results = run_distributed(worker, 1, args=(CASES[:3],), timeout=300)
    for seed, case in enumerate(CASES[:3]):
        impl, dtype, rows, vocab, scale, reduction, ignored, all_ignored = case
        logits, labels, _ = make_case(rows, vocab, dtype, ignored, all_ignored, seed)
        one = cross_entropy(logits, labels, logit_scale=scale, reduction=reduction, impl="torch")
        loss = torch.tensor(results[0][0][seed][0])
        torch.testing.assert_close(loss, one, rtol=1e-5, atol=1e-5)  # tens of ulps apart: see above
        ref = formula(logits.double(), labels, scale, reduction=reduction)
        base = formula(logits, labels, scale, reduction=reduction)
        lscale = max(1.0, ref.abs().max().item())
        assert_close_to_reference(loss, ref, base, 2.0, 4 * dtype_atol(torch.float32, lscale), name=str(case))
