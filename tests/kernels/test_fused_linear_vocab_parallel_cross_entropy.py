"""fused_linear_vocab_parallel_cross_entropy over 2 and 3 gloo processes against one process with the full
weight: the loss (fp64 truth, fp32 F.cross_entropy baseline), the SUM over ranks of the partial hidden
gradients, and each rank's weight-gradient rows (padding rows exactly zero). Padded vocabularies (61 over
2 ranks: 31 + 30 real rows; 20 over 3 ranks of 12 rows: 12 + 8 + 0 real rows), ignored labels, chunks
that do not divide the tokens, reduction sum, mean and none (per-token losses shaped like the labels,
[2, tokens / 2] when tokens is even, identical on every rank, 0 where ignored; the gradients of
sum(w * losses) for random per-token w, computed by the recomputing backward, which makes the collectives
again), logit_scale != 1; the torch path and the Triton row-stats path (the children inherit
TRITON_INTERPRET=1 from this process)."""
import importlib
import os
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

from megacpm.kernels import fused_linear_cross_entropy, fused_linear_vocab_parallel_cross_entropy
from megacpm.parallel.local_launch import run_distributed
from tolerance import assert_close_to_reference, dtype_atol

flce_module = importlib.import_module("megacpm.kernels.fused_linear_cross_entropy")

# (impl, dtype, tokens, hidden, vocab, local_vocab or None (= ceil), scale, reduction, chunk, ignored)
CASES_2 = [
    ("torch", "float32", 13, 16, 61, None, 1 / 9, "mean", 5, (0, 6)),
    ("torch", "float32", 13, 16, 61, None, 2.5, "sum", None, (3,)),
    ("torch", "float32", 13, 16, 64, None, 1.0, "mean", 4, ()),          # no padding
    ("torch", "bfloat16", 13, 32, 61, None, 1 / 9, "mean", 4, (2,)),
    ("triton", "float32", 7, 16, 61, None, 1 / 3, "mean", 3, (1,)),
    ("triton", "float32", 5, 8, 61, None, 2.0, "sum", 2, ()),
    ("triton", "bfloat16", 5, 16, 61, None, 1 / 9, "mean", 2, (4,)),
    ("torch", "float32", 14, 16, 61, None, 1 / 9, "none", 5, (0, 6)),   # labels [2, 7]
    ("torch", "bfloat16", 13, 32, 61, None, 1 / 9, "none", 4, (2,)),    # last chunk of one token
    ("triton", "float32", 7, 16, 61, None, 1 / 3, "none", 3, (1,)),
]
CASES_3 = [
    ("torch", "float32", 13, 16, 20, 12, 1 / 9, "mean", 5, (0, 6)),     # rank 2 holds only padding
    ("torch", "float32", 11, 8, 61, None, 2.5, "sum", 4, (10,)),        # 21 + 21 + 19
    ("triton", "float32", 5, 8, 20, 12, 1 / 3, "sum", 2, (1,)),
    ("torch", "float32", 12, 8, 20, 12, 2.5, "none", 5, (3,)),          # rank 2 only padding; labels [2, 6]
]


def lead_shape(case):
    """The labels' shape: [tokens], or [2, tokens / 2] for reduction "none" with an even token count."""
    tokens, reduction = case[2], case[7]
    return (2, tokens // 2) if reduction == "none" and tokens % 2 == 0 else (tokens,)


def output_grad(case, seed):
    """The loss's gradient the tests backpropagate: 1.7, or random per-token weights for "none"."""
    if case[7] != "none":
        return torch.tensor(1.7)
    return torch.rand(lead_shape(case), generator=torch.Generator().manual_seed(seed + 500)) * 2 - 0.5


def make(case, seed):
    impl, dtype, tokens, hidden_size, vocab, local_vocab, scale, reduction, chunk, ignored = case
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(dt)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.5).to(dt)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[-1] = vocab - 1  # the last real id (on the last rank with real rows)
    for i in ignored:
        labels[i] = -100
    return hidden, weight, labels


def shard_of(weight, rank, world, local_vocab, seed):
    vocab = weight.shape[0]
    local = local_vocab or -(-vocab // world)
    start = rank * local
    valid = max(0, min(local, vocab - start))
    pad = (torch.randn(local - valid, weight.shape[1], generator=torch.Generator().manual_seed(seed + 1000)) * 10)
    return torch.cat([weight[start:start + valid], pad.to(weight.dtype)]), valid


def worker(cases):
    import torch.distributed as dist

    assert os.environ.get("TRITON_INTERPRET") == "1"  # inherited: the triton cases run interpreted
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for seed, case in enumerate(cases):
        impl, dtype, tokens, hidden_size, vocab, local_vocab, scale, reduction, chunk, ignored = case
        hidden, weight, labels = make(case, seed)
        lead = lead_shape(case)
        w_shard, valid = shard_of(weight, rank, world, local_vocab, seed)
        h = hidden.reshape(*lead, hidden_size).clone().requires_grad_(True)
        w = w_shard.clone().requires_grad_(True)
        loss = fused_linear_vocab_parallel_cross_entropy(h, w, labels.reshape(lead),
                                                         None if world == 1 else dist.group.WORLD,
                                                         logit_scale=scale, reduction=reduction,
                                                         valid_rows=valid, chunk_tokens=chunk, impl=impl)
        assert loss.shape == (lead if reduction == "none" else ()), loss.shape
        loss.backward(output_grad(case, seed))
        assert loss.dtype == torch.float32 and h.grad.dtype == h.dtype and w.grad.dtype == w.dtype
        # plain lists: tensors would travel through shared memory that the finished child takes away
        out.append((loss.reshape(-1).tolist(), h.grad.float().reshape(-1, hidden_size).tolist(),
                    w.grad.float().tolist(), valid))
    # every rank refuses the same things, with no collective left half-done
    hidden, weight, labels = make(cases[0], 0)
    w_shard, valid = shard_of(weight, rank, world, cases[0][5], 0)
    refusals = []
    bad = labels.clone()
    bad[2] = weight.shape[0]  # one past the last real id
    for lab, red in ((bad, "mean"), (bad, "none"), (labels, "max")):
        try:
            fused_linear_vocab_parallel_cross_entropy(hidden, w_shard, lab, dist.group.WORLD, reduction=red,
                                                      valid_rows=valid, impl="torch")
            refusals.append(None)
        except (IndexError, ValueError) as exc:
            refusals.append(type(exc).__name__)
    # "none" then .sum() (an expanded, stride-0 grad_output) gives the gradients of "sum", to rounding
    sums = []
    for impl in ("torch", "triton"):
        grads = []
        for red in ("sum", "none"):
            h = hidden.clone().requires_grad_(True)
            w = w_shard.clone().requires_grad_(True)
            fused_linear_vocab_parallel_cross_entropy(h, w, labels, dist.group.WORLD, reduction=red, valid_rows=valid,
                                                      chunk_tokens=4, impl=impl).sum().backward()
            grads.append((h.grad, w.grad))
        sums.append(max(float((a - b).abs().max()) for a, b in zip(*grads)))
    # all labels ignored: loss 0 and zero gradients
    h = hidden.clone().requires_grad_(True)
    w = w_shard.clone().requires_grad_(True)
    loss = fused_linear_vocab_parallel_cross_entropy(h, w, torch.full_like(labels, -100), dist.group.WORLD,
                                                     valid_rows=valid, chunk_tokens=4, impl="torch")
    loss.backward()
    zeros = (loss.item(), float(h.grad.abs().max()), float(w.grad.abs().max()))
    return out, refusals, zeros, sums


def reference(case, seed):
    """(fp64 truth, fp32 PyTorch baseline): loss (per token for "none") and the gradients of
    output_grad * loss (summed) for hidden and the full weight."""
    impl, dtype, tokens, hidden_size, vocab, local_vocab, scale, reduction, chunk, ignored = case
    hidden, weight, labels = make(case, seed)

    def run(h, w, mm_dtype):
        h = h.detach().clone().requires_grad_(True)
        w = w.detach().clone().requires_grad_(True)
        logits = h.to(mm_dtype) @ w.to(mm_dtype).t()
        if mm_dtype != torch.float64:
            logits = logits.float()
        loss = F.cross_entropy(logits * scale, labels, ignore_index=-100, reduction=reduction)
        gh, gw = torch.autograd.grad(loss, (h, w), output_grad(case, seed).reshape(loss.shape).to(loss.dtype))
        return loss.detach(), gh, gw

    return run(hidden.double(), weight.double(), torch.float64), run(hidden, weight, hidden.dtype), hidden, weight


def check_world(world, cases):
    results = run_distributed(worker, world, args=(cases,), timeout=300)
    for r, (_, refusals, zeros, sums) in enumerate(results):
        assert max(sums) < 1e-5, f"rank {r}: 'none' summed differs from 'sum' by {sums}"
        assert refusals == ["IndexError", "IndexError", "ValueError"], f"rank {r}: {refusals}"
        assert zeros == (0.0, 0.0, 0.0), f"rank {r}: all-ignored batch gave {zeros}"
    for seed, case in enumerate(cases):
        label = f"world {world} case {case}"
        (ref, rgh, rgw), (base, bgh, bgw), hidden, weight = reference(case, seed)
        losses = [torch.tensor(r[0][seed][0], dtype=torch.float32).reshape(ref.shape) for r in results]
        for loss in losses[1:]:
            assert torch.equal(loss, losses[0]), f"{label}: ranks disagree on the loss"
        if case[7] == "none":
            _, _, labels = make(case, seed)
            assert bool((losses[0][labels == -100] == 0).all()), f"{label}: an ignored token has a loss"
        lscale = max(1.0, ref.abs().max().item())
        assert_close_to_reference(losses[0], ref, base, 2.0, 4 * dtype_atol(torch.float32, lscale),
                                  name=f"{label} loss")
        mm_dtype = hidden.dtype
        grad_h = sum(torch.tensor(r[0][seed][1], dtype=torch.float64) for r in results).to(hidden.dtype)
        pieces = []
        for r in results:
            gw, valid = torch.tensor(r[0][seed][2]), r[0][seed][3]
            assert bool((gw[valid:] == 0).all()), f"{label}: padding rows got a gradient"
            pieces.append(gw[:valid])
        grad_w = torch.cat(pieces).to(weight.dtype)
        assert grad_w.shape == weight.shape
        length = max(weight.shape[0], hidden.shape[0])
        for name, out, b, r in (("grad hidden (sum over ranks)", grad_h, bgh, rgh), ("grad weight", grad_w, bgw, rgw)):
            gscale = max(1e-3, r.abs().max().item())
            atol = 4 * dtype_atol(mm_dtype, gscale) + length ** 0.5 * dtype_atol(torch.float32, gscale)
            assert_close_to_reference(out, r, b, 2.0, atol, name=f"{label} {name}")


def test_two_ranks_equal_one_process_with_the_full_weight():
    check_world(2, CASES_2)


def test_three_ranks_with_padding_on_two_ranks_one_of_them_all_padding():
    check_world(3, CASES_3)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_group_is_exactly_the_single_rank_fused_function(impl, reduction):
    hidden, weight, labels = make(("torch", "float32", 9, 16, 50, None, 0.5, reduction, 4, (2,)), 3)
    grad = torch.tensor(1.3) if reduction != "none" else torch.rand(9, generator=torch.Generator().manual_seed(5))
    outs = []
    for fn in (lambda h, w: fused_linear_cross_entropy(h, w, labels, logit_scale=0.5, reduction=reduction,
                                                       impl=impl, chunk_tokens=4),
               lambda h, w: fused_linear_vocab_parallel_cross_entropy(h, w, labels, None, logit_scale=0.5,
                                                                      reduction=reduction, impl=impl,
                                                                      chunk_tokens=4)):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fn(h, w)
        loss.backward(grad)
        outs.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_no_group_with_padding_rows_is_the_fused_function_on_the_real_rows():
    hidden, weight, labels = make(("torch", "float32", 9, 16, 50, None, 0.5, "mean", 4, (2,)), 4)
    padded = torch.cat([weight, torch.randn(6, 16) * 10])
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    fused_linear_cross_entropy(h1, w1, labels, impl="torch", chunk_tokens=4).backward()
    h2, w2 = hidden.clone().requires_grad_(True), padded.clone().requires_grad_(True)
    fused_linear_vocab_parallel_cross_entropy(h2, w2, labels, None, valid_rows=50, impl="torch",
                                              chunk_tokens=4).backward()
    assert torch.equal(h1.grad, h2.grad) and torch.equal(w1.grad, w2.grad[:50])
    assert float(w2.grad[50:].abs().max()) == 0.0


def test_one_chunking_rule():
    assert flce_module.default_chunk_tokens(16384, 122_753 // 2 + 1) == (1 << 26) // (122_753 // 2 + 1)
