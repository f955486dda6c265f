"""Expert parallelism's pieces in two gloo processes: the row exchange (all_to_all_single and its
gather fallback) against the rows every rank addressed to each other, its autograd, and
train.init_from of a Hugging Face MiniCPM-MoE directory into EP and TP shards.

References are computed from all ranks' inputs in each process (the inputs are drawn from a seed
shared by the ranks), never by the exchange under test."""
import pytest
import torch
import torch.distributed as dist

from megacpm.checkpoint import load_initial_weights, resolve_init_source
from megacpm.huggingface import write_hf_directory
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.experts import exchange_rows, exchange_rows_by_gather, _Dispatch
from megacpm.parallel.param_spec import param_spec
from tests.checkpoint.test_init_from import _random_weights, _target
from tests.distributed import run_distributed
from tests.tiny_run import make_moe_config

pytestmark = pytest.mark.slow
WORLD, WIDTH = 2, 3


def _inputs():
    """Every rank's rows and splits: splits[s][r] rows of rank s go to rank r (one of them 0)."""
    g = torch.Generator().manual_seed(5)
    splits = [[2, 0], [3, 1]]
    rows = [torch.randn(sum(s), WIDTH, generator=g, dtype=torch.float64) for s in splits]
    return rows, splits


def _exchanges(hf_dir):
    ctx = ParallelContext.initialize(timeout_s=120)
    me = dist.get_rank()
    rows, splits = _inputs()
    out = {}
    for name, exchange in (("all_to_all", exchange_rows), ("gather", exchange_rows_by_gather)):
        x = rows[me].clone().requires_grad_(True)
        received = _Dispatch.apply(x, [splits[s][me] for s in range(WORLD)], splits[me], dist.group.WORLD, exchange)
        weights = torch.arange(1.0, received.shape[0] + 1, dtype=torch.float64)[:, None]
        (received * weights).sum().backward()
        out[name] = (received.detach(), x.grad)
    loaded = {}
    for parallel in (dict(ep=2), dict(tp=2)):
        ctx = ParallelContext.initialize(**parallel, timeout_s=120)
        cfg = make_moe_config(**parallel)
        model = _target(cfg.model, ctx)
        load_initial_weights(resolve_init_source(hf_dir), cfg.model, model)
        loaded[str(parallel)] = {n: (p.detach().clone(), dict(param_spec(p).shard_dims))
                                 for n, p in model.params_by_name().items() if ".mlp." in n}
    return out, loaded


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("experts") / "hf"
    cfg = make_moe_config()
    weights = _random_weights(cfg.model, seed=3)
    write_hf_directory(hf_dir, cfg.model, weights, torch.float32)
    return weights, run_distributed(_exchanges, WORLD, args=(str(hf_dir),), timeout=300)


def test_both_exchanges_deliver_the_addressed_rows_and_return_their_gradients(results):
    _, ranks = results
    rows, splits = _inputs()
    for me, (out, _) in enumerate(ranks):
        want = torch.cat([rows[s][sum(splits[s][:me]):sum(splits[s][:me + 1])] for s in range(WORLD)])
        # The gradient of rank s's row i is the weight its receiver gave it: its 1-based position there.
        for name in ("all_to_all", "gather"):
            received, grad = out[name]
            assert torch.equal(received, want), name
    for me, (out, _) in enumerate(ranks):
        want_grad = torch.empty(sum(splits[me]), 1, dtype=torch.float64)
        start = 0
        for dest in range(WORLD):
            before = sum(splits[s][dest] for s in range(me))  # rows the receiver got from lower ranks first
            count = splits[me][dest]
            want_grad[start:start + count, 0] = torch.arange(before + 1.0, before + count + 1)
            start += count
        for name in ("all_to_all", "gather"):
            assert torch.equal(out[name][1], want_grad.expand(-1, WIDTH)), name


def test_init_from_puts_each_ranks_experts_and_tp_slices_in_place(results):
    weights, ranks = results
    for me, (_, loaded) in enumerate(ranks):
        ep = loaded[str(dict(ep=2))]
        for name in ("layers.0.mlp.w1", "layers.3.mlp.w2"):
            local, dims = ep[name]
            assert dims == {"ep": 0}
            assert torch.equal(local, weights[name][2 * me:2 * me + 2]), name  # 4 experts, 2 per rank
        assert torch.equal(ep["layers.0.mlp.gate.weight"][0], weights["layers.0.mlp.gate.weight"])
        tp = loaded[str(dict(tp=2))]
        w1, dims = tp["layers.1.mlp.w1"]
        assert dims == {"tp": 1} and torch.equal(w1, weights["layers.1.mlp.w1"].chunk(2, dim=1)[me])
        w2, dims = tp["layers.1.mlp.w2"]
        assert dims == {"tp": 2} and torch.equal(w2, weights["layers.1.mlp.w2"].chunk(2, dim=2)[me])
