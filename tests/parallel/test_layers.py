"""TP layers over 2 gloo processes equal the one-process computation, outputs and weight gradients."""
import pytest
import torch
import torch.nn.functional as F

from megacpm.parallel.context import ParallelContext
from megacpm.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megacpm.parallel.mappings import scatter_to_sp
from tests.distributed import run_distributed

VOCAB, DIM, FF, BATCH, SEQ = 12, 8, 6, 2, 4


def full_weights():
    g = torch.Generator().manual_seed(0)
    return {"emb": torch.randn(VOCAB, DIM, generator=g, dtype=torch.float64),
            "col": torch.randn(FF, DIM, generator=g, dtype=torch.float64),
            "row": torch.randn(DIM, FF, generator=g, dtype=torch.float64)}


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randn(BATCH, SEQ, DIM, generator=g, dtype=torch.float64)


def reference():
    w = {k: v.clone().requires_grad_() for k, v in full_weights().items()}
    ids, upstream = inputs()
    y = F.linear(F.silu(F.linear(F.embedding(ids, w["emb"]), w["col"])), w["row"])
    (y * upstream).sum().backward()
    return y.detach(), {k: v.grad for k, v in w.items()}


def _sharded(sequence_parallel):
    ctx = ParallelContext.initialize(tp=2, timeout_s=60)
    group = ctx.group("tp")
    w = full_weights()
    emb = VocabParallelEmbedding.from_full(w["emb"], group, sequence_parallel=sequence_parallel)
    col = ColumnParallelLinear.from_full(w["col"], group, sequence_parallel=sequence_parallel)
    row = RowParallelLinear.from_full(w["row"], group, sequence_parallel=sequence_parallel)
    ids, upstream = inputs()
    y = row(F.silu(col(emb(ids))))
    if sequence_parallel:
        upstream = scatter_to_sp(upstream, group)
    (y * upstream).sum().backward()
    return y.detach(), {"emb": emb.weight.grad, "col": col.weight.grad, "row": row.weight.grad}


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp_layers_equal_one_process(sequence_parallel):
    y_ref, grads_ref = reference()
    results = run_distributed(_sharded, 2, args=(sequence_parallel,))
    ys = [y for y, _ in results]
    y = torch.cat(ys, dim=1) if sequence_parallel else ys[0]
    torch.testing.assert_close(y, y_ref)
    for rank, (_, grads) in enumerate(results):
        torch.testing.assert_close(grads["emb"], grads_ref["emb"].chunk(2, 0)[rank])
        torch.testing.assert_close(grads["col"], grads_ref["col"].chunk(2, 0)[rank])
        torch.testing.assert_close(grads["row"], grads_ref["row"].chunk(2, 1)[rank])


def test_single_process_layers_are_plain_linear_and_embedding():
    w = full_weights()
    ids, x = inputs()
    torch.testing.assert_close(ColumnParallelLinear.from_full(w["col"], None)(x), F.linear(x, w["col"]))
    torch.testing.assert_close(RowParallelLinear.from_full(w["row"], None)(x[..., :FF]), F.linear(x[..., :FF], w["row"]))
    torch.testing.assert_close(VocabParallelEmbedding.from_full(w["emb"], None)(ids), F.embedding(ids, w["emb"]))


def test_uneven_shapes_are_refused(monkeypatch):
    from megacpm.parallel import layers

    monkeypatch.setattr(layers, "group_size", lambda group: 2)
    monkeypatch.setattr(layers, "_rank", lambda group: 0)
    with pytest.raises(ValueError, match="does not divide"):
        layers.shard(torch.zeros(3, 2), 0, None)
    with pytest.raises(ValueError, match="output features 3"):
        layers.ColumnParallelLinear(4, 3, None)


def test_a_vocabulary_is_padded_to_ceil_rows_per_rank(monkeypatch):
    from megacpm.parallel import layers
    from megacpm.parallel.param_spec import param_spec

    monkeypatch.setattr(layers, "group_size", lambda group: 2)
    full = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)
    for rank, valid in ((0, 4), (1, 3)):
        monkeypatch.setattr(layers, "_rank", lambda group, rank=rank: rank)
        embedding = layers.VocabParallelEmbedding.from_full(full, None)
        head = layers.ColumnParallelLinear.from_full(full, None, pad_outputs=True)
        for weight in (embedding.weight, head.weight):
            assert weight.shape == (4, 3) and param_spec(weight).padded_rows == (7, valid)
            assert torch.equal(weight[:valid], full[rank * 4:rank * 4 + valid])
            assert not weight[valid:].any()  # the padding rows are zeros
        assert embedding.vocab_start == rank * 4
