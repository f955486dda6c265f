"""Rank arithmetic of the 3D layout, and the groups as gloo processes really build them."""
import pytest
import torch
import torch.distributed as dist

from megacpm.parallel import LayoutError, ParallelContext, ParallelLayout
from tests.distributed import run_distributed


def test_tp_is_fastest_and_groups_partition_the_world():
    layout = ParallelLayout(world_size=16, tp=2, pp=2)
    assert layout.dp == 4
    assert layout.tp_groups()[0] == [0, 1]  # consecutive: inside one node
    assert layout.coordinates(7) == (1, 3, 0) and layout.rank_of(1, 3, 0) == 7
    assert layout.coordinates(8) == (0, 0, 1)
    for groups, size in ((layout.tp_groups(), 2), (layout.dp_groups(), 4), (layout.pp_groups(), 2),
                         (layout.model_parallel_groups(), 4)):
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(16)) and all(len(g) == size for g in groups)
    assert layout.pp_groups()[0] == [0, 8]
    assert layout.embedding_groups()[0] == [0, 8]
    # A rank's TP peers share its dp and pp coordinates; its DP peers share tp and pp.
    for group in layout.dp_groups():
        assert len({layout.coordinates(r)[0] for r in group}) == 1
        assert len({layout.coordinates(r)[2] for r in group}) == 1


def test_single_stage_embedding_group_is_one_rank():
    assert ParallelLayout(4, tp=2, pp=1).embedding_groups() == [[0], [1], [2], [3]]


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
    return ctx.rank, (ctx.tp_rank, ctx.dp_rank, ctx.pp_rank), out


def test_groups_built_by_gloo_processes_reduce_over_the_right_ranks():
    results = run_distributed(_group_sums, world_size=8, args=(2, 2))
    layout = ParallelLayout(8, tp=2, pp=2)
    for rank, coords, sums in results:
        assert coords == layout.coordinates(rank)
        for kind, (reduced, expected) in sums.items():
            assert reduced == expected, (rank, kind)


def test_single_process_context_has_no_groups():
    ctx = ParallelContext.single()
    assert ctx.world_size == 1 and ctx.group("tp") is None and ctx.is_first_stage and ctx.is_last_stage
