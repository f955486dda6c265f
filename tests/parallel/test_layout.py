"""Rank arithmetic of the 3D layout, and the groups as gloo processes really build them."""
import pytest
import torch
import torch.distributed as dist

from megacpm.parallel import LayoutError, ParallelContext, ParallelLayout
from tests.distributed import run_distributed


def test_tp_is_fastest_and_groups_partition_the_world():
    layout = ParallelLayout(world_size=16, tp=2, pp=2)
    assert layout.dp == 4
    assert layout.named_groups("tp")[0] == [0, 1]  # consecutive: inside one node
    assert layout.coords(7) == dict(tp=1, cp=0, dp=3, pp=0) and layout.rank_at(tp=1, dp=3, pp=0) == 7
    assert layout.coords(8) == dict(tp=0, cp=0, dp=0, pp=1)
    for groups, size in ((layout.named_groups("tp"), 2), (layout.named_groups("dp"), 4),
                         (layout.named_groups("pp"), 2), (layout.named_groups("model_parallel"), 4)):
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(16)) and all(len(g) == size for g in groups)
    assert layout.named_groups("pp")[0] == [0, 8]
    assert layout.named_groups("embedding")[0] == [0, 8]
    # A rank's TP peers share its dp and pp coordinates; its DP peers share tp and pp.
    for group in layout.named_groups("dp"):
        assert len({layout.coords(r)["tp"] for r in group}) == 1
        assert len({layout.coords(r)["pp"] for r in group}) == 1


def test_context_and_expert_axes():
    # cp sits between tp and dp; ep blocks consecutive DP ranks, expert_dp strides over the blocks
    # and spans cp (cp ranks hold the same experts for other tokens); cp splits no parameter, so
    # the gradient-norm group (model_parallel) leaves it out.
    layout = ParallelLayout(world_size=16, tp=2, cp=2, ep=2)
    assert layout.dp == 4
    assert layout.named_groups("cp")[0] == [0, 2]
    assert layout.named_groups("dp")[0] == [0, 4, 8, 12]
    assert layout.named_groups("dp_cp")[0] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert layout.named_groups("ep")[:2] == [[0, 4], [8, 12]]
    assert layout.named_groups("expert_dp")[:2] == [[0, 2, 8, 10], [4, 6, 12, 14]]
    assert layout.named_groups("model_parallel")[0] == [0, 1]
    for kind in ("cp", "dp", "dp_cp", "ep", "expert_dp", "model_parallel"):
        assert sorted(r for g in layout.named_groups(kind) for r in g) == list(range(16)), kind
    with pytest.raises(LayoutError, match=r"parallel\.ep"):
        ParallelLayout(world_size=12, tp=2, ep=4)


def test_single_stage_embedding_group_is_one_rank():
    assert ParallelLayout(4, tp=2, pp=1).named_groups("embedding") == [[0], [1], [2], [3]]


@pytest.mark.parametrize("kwargs, key", [
    (dict(world_size=6, tp=4), "parallel.tp * parallel.pp"),
    (dict(world_size=4, tp=0), "parallel.tp"),
])
def test_impossible_layouts_name_the_key(kwargs, key):
    with pytest.raises(LayoutError, match=key.replace("*", r"\*").replace(".", r"\.")):
        ParallelLayout(**kwargs)


def _group_sums(tp, pp):
    ctx = ParallelContext.initialize(tp=tp, pp=pp, timeout_s=60)
    out = {}
    for kind in ("tp", "dp", "pp", "model_parallel"):
        value = torch.tensor([float(ctx.rank)])
        dist.all_reduce(value, group=ctx.group(kind))
        out[kind] = (value.item(), sum(ctx.group_ranks[kind]))
    return ctx.rank, dict(tp=ctx.tp_rank, cp=ctx.coord("cp"), dp=ctx.dp_rank, pp=ctx.pp_rank), out


def test_groups_built_by_gloo_processes_reduce_over_the_right_ranks():
    results = run_distributed(_group_sums, world_size=8, args=(2, 2))
    layout = ParallelLayout(8, tp=2, pp=2)
    for rank, coords, sums in results:
        assert coords == layout.coords(rank)
        for kind, (reduced, expected) in sums.items():
            assert reduced == expected, (rank, kind)


def test_single_process_context_has_no_groups():
    ctx = ParallelContext.single()
    assert ctx.world_size == 1 and ctx.group("tp") is None and ctx.is_first_stage and ctx.is_last_stage
