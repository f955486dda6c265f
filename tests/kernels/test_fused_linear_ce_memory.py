"""fused_linear_cross_entropy_workspace_bytes against the measured CPU peak (tests/memory_probe.py) of a
forward + backward of the fused path (impl "torch"), within 20%: one rank at several (tokens, vocab,
hidden, chunk) settings and dtypes, and 2 gloo ranks with a padded vocabulary. Sizes where the workspace
(the fp32 weight-gradient accumulator, the hidden gradient, one chunk's logits) dominates."""
from datetime import timedelta

import pytest
import torch

from megacpm.kernels import (fused_linear_cross_entropy, fused_linear_cross_entropy_workspace_bytes,
                             fused_linear_vocab_parallel_cross_entropy)
from megacpm.parallel.local_launch import run_distributed
from tests.memory_probe import peak_bytes

F32, BF16 = torch.float32, torch.bfloat16
TOLERANCE = 0.2


def inputs(tokens, vocab, hidden_size, h_dtype, w_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(h_dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.1).to(w_dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::7] = -100
    return hidden, weight, labels


def assert_within(measured, estimated, label):
    print(f"{label}: measured {measured} B, estimated {estimated} B, ratio {measured / estimated:.4f}")
    assert abs(measured - estimated) <= TOLERANCE * estimated, \
        f"{label}: measured {measured} B vs estimated {estimated} B"


# (tokens, vocab, hidden, chunk, hidden dtype, weight dtype, autocast dtype)
SINGLE = [
    (2048, 8000, 256, 512, F32, F32, None),
    (2048, 8000, 256, None, F32, F32, None),   # the default chunk: all 2048 tokens at once
    (1000, 8000, 256, 300, F32, F32, None),    # a chunk that does not divide the tokens
    (1024, 4000, 128, 300, BF16, BF16, None),
    (1024, 4000, 128, 300, BF16, F32, None),   # the weight cast to bf16 once
    (1024, 4000, 128, 300, F32, F32, BF16),    # autocast: hidden and weight cast
]


@pytest.mark.parametrize("tokens,vocab,hidden_size,chunk,h_dtype,w_dtype,autocast", SINGLE)
def test_single_rank_workspace_matches_the_measured_peak(tokens, vocab, hidden_size, chunk, h_dtype, w_dtype,
                                                         autocast):
    hidden, weight, labels = inputs(tokens, vocab, hidden_size, h_dtype, w_dtype)

    def step():
        with torch.autocast("cpu", dtype=autocast or BF16, enabled=autocast is not None):
            loss = fused_linear_cross_entropy(hidden, weight, labels, logit_scale=0.5, impl="torch",
                                              chunk_tokens=chunk)
        loss.backward()

    _, measured = peak_bytes(step)
    assert hidden.grad is not None and weight.grad is not None
    estimated = fused_linear_cross_entropy_workspace_bytes(tokens, hidden_size, vocab, autocast or h_dtype,
                                                           h_dtype, w_dtype, chunk_tokens=chunk)
    assert_within(measured, estimated, f"tokens {tokens} vocab {vocab} hidden {hidden_size} chunk {chunk} "
                                       f"{h_dtype}/{w_dtype}/autocast {autocast}")


def tp_worker(tokens, vocab, hidden_size, chunk):
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    local = -(-vocab // world)
    valid = max(0, min(local, vocab - rank * local))
    hidden, weight, labels = inputs(tokens, vocab, hidden_size, F32, F32)
    hidden = hidden.detach().requires_grad_(True)
    shard = torch.cat([weight.detach()[rank * local:rank * local + valid], torch.zeros(local - valid, hidden_size)])
    shard.requires_grad_(True)

    def step():
        loss = fused_linear_vocab_parallel_cross_entropy(hidden, shard, labels, dist.group.WORLD, logit_scale=0.5,
                                                         valid_rows=valid, chunk_tokens=chunk, impl="torch")
        loss.backward()

    _, measured = peak_bytes(step)
    estimated = fused_linear_cross_entropy_workspace_bytes(tokens, hidden_size, local, F32, F32, F32,
                                                           chunk_tokens=chunk, valid_rows=valid)
    return measured, estimated, valid


@pytest.mark.parametrize("chunk", [700, None])
def test_two_ranks_with_padding_workspace_matches_the_measured_peak(chunk):
    tokens, vocab, hidden_size = 2048, 8001, 256  # 4001 rows per rank; rank 1 has 4000 real ones
    results = run_distributed(tp_worker, 2, args=(tokens, vocab, hidden_size, chunk), timeout=300)
    assert [r[2] for r in results] == [4001, 4000]
    for rank, (measured, estimated, valid) in enumerate(results):
        assert_within(measured, estimated, f"tp rank {rank} (valid rows {valid}) chunk {chunk}")
