"""Pipeline schedules as data: the ordered forward/backward actions of each pipeline rank.

A schedule is a pure function of (pp, rank, micro_batches, vpp), so the executor, the tests and the
bubble benchmark all read the same list. ``simulate`` replays every rank's list against the data
dependencies between stages and measures each rank's idle time.

1F1B (PipeDream-flush): rank r runs min(pp - r - 1, m) warm-up forwards, then alternates one forward
and one backward, then drains the remaining backwards. Peak in-flight activations: pp - r.

Interleaved 1F1B (Megatron): each rank holds ``vpp`` model chunks (virtual stages chunk * pp + rank).
Micro-batches go through the chunks in groups of pp; the warm-up is (pp - r - 1) * 2 + (vpp - 1) * pp
forwards. It needs m to be a multiple of pp. The bubble shrinks by the factor vpp.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple


@dataclass(frozen=True)
class Action:
    kind: str  # "F" or "B"
    micro_batch: int
    chunk: int = 0  # model chunk on this rank (virtual stage = chunk * pp + rank)


def check_schedule(pp: int, micro_batches: int, vpp: int) -> None:
    if pp < 1 or vpp < 1 or micro_batches < 1:
        raise ValueError("pp, vpp and the number of micro-batches must be positive")
    if vpp > 1 and micro_batches % pp:
        raise ValueError(
            f"interleaved pipeline (parallel.vpp={vpp}) needs the micro-batches per step ({micro_batches}) "
            f"to be a multiple of parallel.pp ({pp})"
        )


def one_f_one_b(pp: int, rank: int, micro_batches: int) -> List[Action]:
    warmup = min(pp - rank - 1, micro_batches)
    actions = [Action("F", mb) for mb in range(warmup)]
    next_forward, next_backward = warmup, 0
    while next_forward < micro_batches:
        actions.append(Action("F", next_forward))
        actions.append(Action("B", next_backward))
        next_forward, next_backward = next_forward + 1, next_backward + 1
    actions += [Action("B", mb) for mb in range(next_backward, micro_batches)]
    return actions


def _interleaved_unit(k: int, pp: int, vpp: int, forward: bool) -> Tuple[int, int]:
    """(micro_batch, chunk) of this rank's k-th forward (or backward) unit."""
    group, within = divmod(k, pp * vpp)
    chunk = (k // pp) % vpp
    if not forward:
        chunk = vpp - 1 - chunk
    return group * pp + within % pp, chunk


def interleaved_one_f_one_b(pp: int, rank: int, micro_batches: int, vpp: int) -> List[Action]:
    check_schedule(pp, micro_batches, vpp)
    total = micro_batches * vpp
    warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    actions = [Action("F", *_interleaved_unit(k, pp, vpp, True)) for k in range(warmup)]
    forward_k, backward_k = warmup, 0
    while forward_k < total:
        actions.append(Action("F", *_interleaved_unit(forward_k, pp, vpp, True)))
        actions.append(Action("B", *_interleaved_unit(backward_k, pp, vpp, False)))
        forward_k, backward_k = forward_k + 1, backward_k + 1
    actions += [Action("B", *_interleaved_unit(k, pp, vpp, False)) for k in range(backward_k, total)]
    return actions


def build_schedule(pp: int, rank: int, micro_batches: int, vpp: int = 1) -> List[Action]:
    check_schedule(pp, micro_batches, vpp)
    if vpp == 1:
        return one_f_one_b(pp, rank, micro_batches)
    return interleaved_one_f_one_b(pp, rank, micro_batches, vpp)


def simulate(pp: int, micro_batches: int, vpp: int = 1, forward_time: float = 1.0,
             backward_time: float = 2.0) -> Dict[str, float]:
    """Replay all ranks' schedules; a chunk's forward/backward costs its share of a stage's time.

    Returns the makespan and the mean fraction of it each rank sits idle (the pipeline bubble).
    Raises RuntimeError if the schedules deadlock (a dependency that can never be met).
    """
    schedules = [build_schedule(pp, r, micro_batches, vpp) for r in range(pp)]
    stages = pp * vpp
    cost = {"F": forward_time / vpp, "B": backward_time / vpp}
    done: Dict[Tuple[str, int, int], float] = {}  # (kind, micro_batch, virtual stage) -> finish time
    position = [0] * pp
    free_at = [0.0] * pp
    busy = [0.0] * pp
    progressed = True
    while progressed:
        progressed = False
        for rank in range(pp):
            while position[rank] < len(schedules[rank]):
                action = schedules[rank][position[rank]]
                stage = action.chunk * pp + rank
                if action.kind == "F":
                    dep = ("F", action.micro_batch, stage - 1) if stage > 0 else None
                else:
                    dep = ("B", action.micro_batch, stage + 1) if stage < stages - 1 else ("F", action.micro_batch, stage)
                if dep is not None and dep not in done:
                    break
                start = max(free_at[rank], done[dep] if dep is not None else 0.0)
                free_at[rank] = start + cost[action.kind]
                busy[rank] += cost[action.kind]
                done[(action.kind, action.micro_batch, stage)] = free_at[rank]
                position[rank] += 1
                progressed = True
    if any(position[r] < len(schedules[r]) for r in range(pp)):
        raise RuntimeError(f"pipeline schedule deadlocks (pp={pp}, vpp={vpp}, micro_batches={micro_batches})")
    makespan = max(free_at)
    return {"makespan": makespan, "bubble_fraction": sum(1 - b / makespan for b in busy) / pp}


def one_f_one_b_bubble(pp: int, micro_batches: int) -> float:
    """The analytic 1F1B idle fraction (pp - 1) / (m + pp - 1)."""
    return (pp - 1) / (micro_batches + pp - 1)
