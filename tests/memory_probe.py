"""A CPU peak-memory probe for tests: how many bytes of tensor memory a function holds at its peak.

    result, peak_extra_bytes = peak_bytes(fn)

``peak_extra_bytes`` is the peak, while ``fn()`` runs, of the CPU tensor memory allocated through
PyTorch's allocator during ``fn`` and not yet freed: the peak above what was live when it started, for
any ``fn`` that does not free memory allocated before it started (such frees are not reported by the
profiler -- it warns "Memory block of unknown size" -- so they count as 0 and the result is then an
upper bound). Never below 0.

How: torch.profiler with profile_memory=True records every allocation and free of the CPU allocator as
a "[memory]" event with its signed size. The raw events (the profiler's kineto results, not
``prof.events()``, which folds allocations made inside an operator into that operator's totals) are
sorted by time and summed; the peak of the running sum is the answer.

Seen (tests/test_memory_probe.py checks each): allocations on the calling thread, inside autograd's
backward (the engine runs CPU work on the calling thread), and in each process of a torch.distributed
gloo job (each profiles itself), around its collectives. Not seen: threads the code starts itself (the
profiler records on the threads it is enabled on), memory that bypasses PyTorch's allocator (numpy
buffers, gloo's transport buffers, the Triton interpreter's copies).
"""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def memory_events(prof: profile) -> List[Tuple[int, int]]:
    """(time in ns, signed bytes) of every CPU allocation (+) and free (-) a finished profile recorded."""
    out = []
    for event in prof.profiler.kineto_results.events():
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU:
            out.append((event.start_ns(), int(event.nbytes())))
    out.sort(key=lambda item: item[0])  # stable: events of the same ns keep their recorded order
    return out


def peak_bytes(fn: Callable[[], Any]) -> Tuple[Any, int]:
    """(fn(), the peak of live CPU tensor bytes above the starting level while fn ran)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    running = peak = 0
    for _, nbytes in memory_events(prof):
        running += nbytes
        peak = max(peak, running)
    return result, peak
