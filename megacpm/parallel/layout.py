"""Rank arithmetic of a parallel layout with named axes: which ranks form each group.

The axes, fastest first (Megatron's order, so a TP group is a run of consecutive ranks and stays
inside a node when tp divides the GPUs per node):

    tp   tensor parallel (and sequence parallel, which reuses the TP group)
    cp   context parallel: the sequence split over ranks (size 1 until long-context training)
    dp   data parallel: replicas of the model, each on its own share of the batch
    pp   pipeline parallel

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

Expert parallelism does not add ranks: ``ep`` splits each DP group into ep-sized blocks of
consecutive DP ranks (the experts are sharded over a block; "expert_dp" reduces the expert
gradients over the blocks and over the cp ranks, which hold the same experts for other tokens), so
it must divide dp.

A group is named by the axes it spans: ``groups(("tp",))`` are the TP groups, ``groups(("dp",
"cp"))`` the ranks over which a dense gradient is reduced, ``groups(("tp", "pp"))`` the ranks
holding the distinct parameter parts of one replica (the gradient-norm group). Adding an axis is adding
a size here, not re-deriving every group. Pure functions of the sizes: testable without any process
group, and importable without torch.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

AXES = ("tp", "cp", "dp", "pp")  # rank-order axes, fastest first
# Named groups of the engine: the axes each spans. "embedding" (first and last pipeline stage) and
# the expert groups are not products of whole axes and are built by their own methods.
GROUP_AXES: Dict[str, Tuple[str, ...]] = {
    "tp": ("tp",),
    "cp": ("cp",),
    "dp": ("dp",),
    "pp": ("pp",),
    "dp_cp": ("dp", "cp"),  # dense gradients: every replica and every sequence shard
    # The distinct parameter parts of one replica: the grad-norm group. Context parallelism splits
    # tokens, never parameters: cp ranks hold copies, reduced with the replicas (dp_cp).
    "model_parallel": ("tp", "pp"),
}
GROUP_KINDS = (*GROUP_AXES, "embedding", "ep", "expert_dp")


class LayoutError(ValueError):
    """A layout that cannot be built from the world size; the message names the parallel.* key."""


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for key in ("world_size", "tp", "pp", "vpp", "cp", "ep"):
            if getattr(self, key) < 1:
                raise LayoutError(f"parallel.{key}: must be positive, got {getattr(self, key)}")
        model_parallel = self.tp * self.cp * self.pp
        if self.world_size % model_parallel:
            names = " * ".join(f"parallel.{a}" for a in ("tp", "cp", "pp") if a != "cp" or self.cp > 1)
            raise LayoutError(f"{names} = {model_parallel} does not divide the world size {self.world_size}")
        if self.dp % self.ep:
            raise LayoutError(f"parallel.ep: {self.ep} does not divide the data-parallel size {self.dp}")

    @classmethod
    def from_config(cls, parallel, world_size: int) -> "ParallelLayout":
        """The layout of a ``ParallelConfig`` (its sizes; dp is derived) on ``world_size`` ranks."""
        return cls(world_size, tp=parallel.tp, pp=parallel.pp, vpp=parallel.vpp, cp=parallel.cp, ep=parallel.ep)

    # -- sizes and coordinates -----------------------------------------------------------------
    @property
    def dp(self) -> int:
        """The data-parallel size: world_size / (tp * cp * pp). Its one home."""
        return self.world_size // (self.tp * self.cp * self.pp)

    def size(self, axis: str) -> int:
        if axis not in AXES:
            raise KeyError(f"unknown parallel axis {axis!r} (axes: {', '.join(AXES)})")
        return getattr(self, axis)

    def sizes(self) -> Dict[str, int]:
        return {axis: self.size(axis) for axis in AXES}

    def coords(self, rank: int) -> Dict[str, int]:
        """{axis: index} of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        coords = {}
        for axis in AXES:
            coords[axis], rank = rank % self.size(axis), rank // self.size(axis)
        return coords

    def rank_at(self, **coords: int) -> int:
        """The global rank at the given axis indices (unnamed axes: 0)."""
        unknown = set(coords) - set(AXES)
        if unknown:
            raise KeyError(f"unknown parallel axes {sorted(unknown)}")
        rank, stride = 0, 1
        for axis in AXES:
            rank += coords.get(axis, 0) * stride
            stride *= self.size(axis)
        return rank

    # -- groups --------------------------------------------------------------------------------
    def groups(self, axes: Sequence[str]) -> List[List[int]]:
        """Partition of the world into groups of ranks that differ only along ``axes`` (ascending
        ranks in each group; groups in the order of the other axes' coordinates)."""
        for axis in axes:
            self.size(axis)
        others = [a for a in AXES if a not in axes]
        result = []
        for fixed in itertools.product(*(range(self.size(a)) for a in reversed(others))):
            fixed_coords = dict(zip(reversed(others), fixed))
            members = [self.rank_at(**fixed_coords, **dict(zip(axes, varying)))
                       for varying in itertools.product(*(range(self.size(a)) for a in axes))]
            result.append(sorted(members))
        return result

    def named_groups(self, kind: str) -> List[List[int]]:
        """The groups of one of GROUP_KINDS."""
        if kind in GROUP_AXES:
            return self.groups(GROUP_AXES[kind])
        if kind == "embedding":
            # First and last pipeline stage of each pipeline: they share the tied embedding's gradient.
            return [sorted({group[0], group[-1]}) for group in self.groups(("pp",))]
        if kind == "ep":
            return [group[i:i + self.ep] for group in self.groups(("dp",)) for i in range(0, self.dp, self.ep)]
        if kind == "expert_dp":
            # The ranks of one (tp, pp) position at the same place in their EP block, any cp.
            return [[r for r in group if self.coords(r)["dp"] % self.ep == i]
                    for group in self.groups(("dp", "cp")) for i in range(self.ep)]
        raise KeyError(f"unknown group kind {kind!r} (kinds: {', '.join(GROUP_KINDS)})")

    def expert_block(self, rank: int) -> List[List[int]]:
        """[ep][tp] ranks holding, together, one copy of every expert with ``rank`` among them: its
        EP group's members (consecutive DP ranks) and each one's TP group. The experts' checkpoint
        mesh."""
        coords = self.coords(rank)
        first = coords["dp"] - coords["dp"] % self.ep
        return [[self.rank_at(**{**coords, "dp": first + i, "tp": t}) for t in range(self.tp)]
                for i in range(self.ep)]

    def describe(self) -> str:
        """``tp 2 x cp 1 x dp 4 x pp 2`` (+ vpp, ep when not 1)."""
        text = " x ".join(f"{axis} {self.size(axis)}" for axis in AXES)
        extras = [f"{name} {getattr(self, name)}" for name in ("vpp", "ep") if getattr(self, name) > 1]
        return text + (f" ({', '.join(extras)})" if extras else "")

