"""Context-parallel attention cores (all-gather and ring) in 2 and 4 gloo processes against one
process's causal attention of the whole sequence, in float64: values and the gradients of q, k
and v, with grouped-query heads, with and without a document mask; the ring with each block
kernel (fused chunk pairs, masked).

Each rank draws the whole sequence from a seed shared by the ranks, computes the reference on it
with the single-process core (megacpm.model.attention.sdpa_attention), and runs the cp core on its
head-tail share (megacpm.data.batch.context_parallel_index)."""
import pytest
import torch
import torch.distributed as dist

from megacpm.data.batch import context_parallel_index, head_tail_chunks
from megacpm.model.attention import sdpa_attention
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.context_parallel import (AllGatherAttention, RingAttention, global_order,
                                               merge_partials)
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow
SEQ, BATCH, HEADS, KV_HEADS, DIM = 16, 2, 4, 2, 8


def _inputs():
    g = torch.Generator().manual_seed(11)
    q = torch.randn(BATCH, SEQ, HEADS, DIM, generator=g, dtype=torch.float64)
    k = torch.randn(BATCH, SEQ, KV_HEADS, DIM, generator=g, dtype=torch.float64)
    v = torch.randn(BATCH, SEQ, KV_HEADS, DIM, generator=g, dtype=torch.float64)
    weights = torch.randn(BATCH, SEQ, HEADS, DIM, generator=g, dtype=torch.float64)
    # Packed documents of lengths 5, 7, 4 in row 0 and 9, 7 in row 1: boundaries inside chunks.
    docs = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7])
    return q, k, v, weights, docs


def _run(core, q, k, v, weights, docs):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = core(q, k, v, document_ids=docs)
    (out * weights).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _worker():
    ctx = ParallelContext.initialize(timeout_s=120)
    cp, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    q, k, v, weights, docs = _inputs()
    index = context_parallel_index(rank, cp, SEQ)
    results = {}
    for masked in (False, True):
        reference = _run(sdpa_attention, q, k, v, weights, docs if masked else None)
        reference = [t.index_select(1, index) for t in reference]
        for name, core in (("all_gather", AllGatherAttention(group, "sdpa")),
                           ("all_gather_eager", AllGatherAttention(group, "eager")),
                           ("ring", RingAttention(group)),
                           ("ring_masked", RingAttention(group, "masked"))):
            local = [t.index_select(1, index) for t in (q, k, v, weights)]
            local_docs = docs.index_select(1, index) if masked else None
            if name == "ring":  # the fused chunk-pair kernel without a mask, the masked one with
                assert core.uses_fused(local[0], local_docs) == (not masked)
            got = _run(core, *local, local_docs)
            results[(name, masked)] = max(float((a - b).abs().max()) for a, b in zip(got, reference))
    ctx.destroy()
    return results


@pytest.fixture(scope="module", params=[2, 4])
def errors(request):
    return run_distributed(_worker, request.param, timeout=300)


def test_cp_cores_equal_the_whole_sequence_attention(errors):
    for rank_errors in errors:
        for (name, masked), error in rank_errors.items():
            # the eager core takes its softmax in fp32 (as the one-process eager path does)
            assert error < (1e-6 if name.endswith("eager") else 1e-12), (name, masked, error)


def test_head_tail_split_and_its_inverse():
    assert [head_tail_chunks(r, 4) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    order = global_order(4)
    gathered = torch.cat([context_parallel_index(r, 4, 16) for r in range(4)])
    # gathered chunk order -> global order is the identity on positions
    chunks = gathered.view(8, 2)
    assert torch.equal(chunks[order].flatten(), torch.arange(16))


def test_merge_by_log_sum_exp_equals_one_softmax():
    g = torch.Generator().manual_seed(2)
    scores, values = torch.randn(3, 10, generator=g, dtype=torch.float64), torch.randn(10, 4, generator=g,
                                                                                          dtype=torch.float64)
    scores[1, :6] = float("-inf")  # a row that sees nothing of the first block
    whole = torch.softmax(scores, -1) @ values

    def part(cols):
        s = scores[:, cols]
        lse = torch.logsumexp(s, -1)
        safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        return torch.exp(s - safe[:, None]) @ values[cols], lse

    out, lse = merge_partials(*part(slice(0, 6)), *part(slice(6, 10)))
    assert torch.allclose(out, whole, atol=1e-14)
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-14)
