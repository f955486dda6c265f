"""The TP/SP mappings over 2 gloo processes: forward and backward against their analytic definitions."""
import torch

from megacpm.parallel import mappings
from megacpm.parallel.context import ParallelContext
from tests.distributed import run_distributed

WORLD = 2


def per_rank(rank, shape, salt):
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 * salt + rank), dtype=torch.float64)


def _apply_all():
    ctx = ParallelContext.initialize(tp=WORLD, timeout_s=60)
    group, rank = ctx.group("tp"), ctx.rank
    out = {}
    for i, name in enumerate(["copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp",
                              "scatter_to_sp", "gather_from_sp", "reduce_scatter_sp"]):
        fn = getattr(mappings, name)
        replicated_input = name in ("scatter_to_tp", "scatter_to_sp")
        x = per_rank(0 if replicated_input else rank, (2, 4, 6), salt=i).requires_grad_()
        y = fn(x, group)
        replicated_output = name in ("reduce_from_tp", "gather_from_tp")
        grad = per_rank(0 if replicated_output else rank, y.shape, salt=50 + i)
        y.backward(grad)
        out[name] = (y.detach(), x.grad)
    return out


def test_mappings_match_their_definitions():
    results = run_distributed(_apply_all, WORLD)
    xs = lambda i: [per_rank(r, (2, 4, 6), i) for r in range(WORLD)]  # noqa: E731
    for rank, out in enumerate(results):
        def grads(i, shape):
            return [per_rank(r, shape, 50 + i) for r in range(WORLD)]

        y, gx = out["copy_to_tp"]
        assert torch.equal(y, xs(0)[rank]) and torch.allclose(gx, sum(grads(0, y.shape)))
        y, gx = out["reduce_from_tp"]
        assert torch.allclose(y, sum(xs(1))) and torch.equal(gx, grads(1, y.shape)[0])
        y, gx = out["scatter_to_tp"]
        assert torch.equal(y, xs(2)[0].chunk(WORLD, -1)[rank])
        assert torch.equal(gx, torch.cat(grads(2, y.shape), -1))
        y, gx = out["gather_from_tp"]
        assert torch.equal(y, torch.cat(xs(3), -1)) and torch.equal(gx, grads(3, y.shape)[0].chunk(WORLD, -1)[rank])
        y, gx = out["scatter_to_sp"]
        assert torch.equal(y, xs(4)[0].chunk(WORLD, 1)[rank]) and torch.equal(gx, torch.cat(grads(4, y.shape), 1))
        y, gx = out["gather_from_sp"]
        assert torch.equal(y, torch.cat(xs(5), 1))
        assert torch.allclose(gx, sum(grads(5, y.shape)).chunk(WORLD, 1)[rank])
        y, gx = out["reduce_scatter_sp"]
        assert torch.allclose(y, sum(xs(6)).chunk(WORLD, 1)[rank])
        assert torch.equal(gx, torch.cat(grads(6, y.shape), 1))


def test_single_process_mappings_are_identity():
    x = torch.randn(2, 4, 6)
    for name in ("copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp",
                 "scatter_to_sp", "gather_from_sp", "reduce_scatter_sp"):
        assert getattr(mappings, name)(x, None) is x
