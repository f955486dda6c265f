"""The process groups of a run, built once from the world size and the configured layout.

Nothing here is global: the trainer creates one ParallelContext and hands it to whatever needs a
group. A single-process run gets a context whose groups are all None, and every collective in
megacpm treats a None group (or a group of one) as the identity.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from megacpm.parallel.layout import GROUP_KINDS, ParallelLayout

T = TypeVar("T")


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when an action run on rank 0 for all (``run_on_rank0``) failed
    there: rank 0 reports the failure itself, so the others leave quietly."""


@dataclass
class ParallelContext:
    layout: ParallelLayout
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    groups: Dict[str, Optional[dist.ProcessGroup]] = field(default_factory=dict)
    group_ranks: Dict[str, List[int]] = field(default_factory=dict)
    # All ranks over gloo, for checkpoint writes in a background thread: collectives of two threads
    # must not share a group (their order would interleave differently on different ranks).
    background_group: Optional[dist.ProcessGroup] = None

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def single(cls, device: Optional[torch.device] = None) -> "ParallelContext":
        return cls(ParallelLayout(1), 0, device or torch.device("cpu"),
                   {k: None for k in GROUP_KINDS}, {k: [0] for k in GROUP_KINDS})

    @classmethod
    def initialize(cls, tp: int = 1, pp: int = 1, vpp: int = 1, timeout_s: float = 600.0,
                   backend: Optional[str] = None, device_type: Optional[str] = None,
                   cp: int = 1, ep: int = 1) -> "ParallelContext":
        """Join the default process group (from torchrun's environment) and build every group.

        ``device_type`` "cuda" puts this rank on GPU LOCAL_RANK (NCCL), "cpu" keeps it on the CPU
        (gloo); None picks CUDA when available. A rank that dies makes the others' collectives fail
        after ``timeout_s`` instead of hanging.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        layout = ParallelLayout(world_size, tp, pp, vpp, cp, ep)  # validates before any group exists
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if world_size == 1 and not dist.is_initialized():
            return cls.single(device)
        if not dist.is_initialized():
            backend = backend or ("nccl" if device.type == "cuda" else "gloo")
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        rank = dist.get_rank()
        groups: Dict[str, Optional[dist.ProcessGroup]] = {}
        group_ranks: Dict[str, List[int]] = {}
        # Kinds spanning the same ranks (dp and dp_cp while cp is 1) share one process group.
        created: Dict[Tuple[int, ...], dist.ProcessGroup] = {}
        for kind in GROUP_KINDS:
            # Every rank must create every group, in the same order, even those it is not in.
            for ranks in layout.named_groups(kind):
                key = tuple(ranks)
                if key not in created:
                    created[key] = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s))
                if rank in ranks:
                    groups[kind], group_ranks[kind] = created[key], ranks
        background = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        return cls(layout, rank, device, groups, group_ranks, background)

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def run_on_rank0(self, action: Callable[[], T]) -> T:
        """``action()`` on rank 0 (the run directory's writer), its result shared with every rank.
        If it raises, rank 0 re-raises the exception and every other rank raises RankZeroFailed with
        its text: all ranks leave together instead of the others waiting in the next collective."""
        result, failure = None, None
        if self.rank == 0:
            try:
                result = action()
            except Exception as exc:  # noqa: BLE001 - shared, then re-raised as it was
                failure = exc
        if self.world_size > 1:
            shared = [result, None if failure is None else f"{type(failure).__name__}: {failure}"]
            dist.broadcast_object_list(shared, src=0)
            result, text = shared
            if self.rank != 0 and text is not None:
                raise RankZeroFailed(text)
        if failure is not None:
            raise failure
        return result

    # -- coordinates -----------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def coord(self, axis: str) -> int:
        """This rank's index along a parallel axis (tp, cp, dp, pp)."""
        return self.layout.coords(self.rank)[axis]

    @property
    def tp_rank(self) -> int:
        return self.coord("tp")

    @property
    def dp_rank(self) -> int:
        return self.coord("dp")

    @property
    def pp_rank(self) -> int:
        return self.coord("pp")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def group(self, kind: str) -> Optional[dist.ProcessGroup]:
        """This rank's process group of one of GROUP_KINDS (None in a single process)."""
        if kind not in self.groups:
            raise KeyError(f"unknown process group kind {kind!r} (kinds: {', '.join(GROUP_KINDS)})")
        return self.groups[kind]


# Messages of the backends' errors when a peer is gone or silent (gloo raises plain RuntimeErrors).
_PEER_FAILURE_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
                         "Timeout", "NCCL", "gloo/transport")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether an exception from a collective means another rank died or stalled (not a bug here)."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _PEER_FAILURE_MARKERS)

