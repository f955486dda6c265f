"""Rank arithmetic of a 3D layout: which ranks form the TP, PP, DP and embedding groups.

Ranks are ordered tensor-parallel fastest, then data-parallel, then pipeline (Megatron's order), so
a TP group is a run of consecutive ranks and stays inside a node when tp divides the GPUs per node:

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

Pure functions of (world_size, tp, pp): testable without any process group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple


class LayoutError(ValueError):
    """A layout that cannot be built from the world size; the message names the parallel.* key."""


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1

    def __post_init__(self) -> None:
        for key in ("world_size", "tp", "pp", "vpp"):
            if getattr(self, key) < 1:
                raise LayoutError(f"parallel.{key}: must be positive, got {getattr(self, key)}")
        if self.world_size % (self.tp * self.pp):
            raise LayoutError(
                f"parallel.tp * parallel.pp = {self.tp * self.pp} does not divide the world size {self.world_size}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def coordinates(self, rank: int) -> Tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def tp_groups(self) -> List[List[int]]:
        return [[self.rank_of(t, d, p) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> List[List[int]]:
        return [[self.rank_of(t, d, p) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> List[List[int]]:
        return [[self.rank_of(t, d, p) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def embedding_groups(self) -> List[List[int]]:
        """First and last pipeline stage of each pipeline: they share the tied embedding's gradient."""
        return [sorted({group[0], group[-1]}) for group in self.pp_groups()]

    def model_parallel_groups(self) -> List[List[int]]:
        """All ranks holding distinct parts of one model replica (TP x PP): the grad-norm group."""
        return [[self.rank_of(t, d, p) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)]
