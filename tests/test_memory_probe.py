"""tests/memory_probe.py: peak_bytes against allocations of known sizes -- on the calling thread, inside an
autograd backward, and inside gloo processes -- within 1%."""
import threading
from datetime import timedelta

import pytest
import torch

from megacpm.parallel.local_launch import run_distributed
from tests.memory_probe import peak_bytes

MB = 1 << 20


def close(measured, expected, rel=0.01):
    assert abs(measured - expected) <= rel * expected, f"measured {measured} bytes, expected {expected}"


def known_pattern():
    """Live totals 4, 6, 2, 14, 13 MiB (fp32 elements of 4 bytes): the peak is 14 MiB."""
    a = torch.empty(MB)           # 4 MiB
    b = torch.empty(MB // 2)      # +2 MiB
    del a                         # -4 MiB
    c = torch.empty(3 * MB)       # +12 MiB -> 14 MiB
    b = None                      # -2 MiB
    d = torch.zeros(MB // 4, dtype=torch.float64)  # +2 MiB -> 14 MiB again, not more
    return c.numel() + d.numel() + (b is None)


def test_peak_of_known_allocations():
    result, peak = peak_bytes(known_pattern)
    assert result == 3 * MB + MB // 4 + 1
    close(peak, 14 * MB)


def test_memory_live_before_the_call_is_not_counted():
    keep = torch.empty(8 * MB)
    _, peak = peak_bytes(lambda: torch.empty(MB).sum() + keep[0])  # 4 MiB inside, 32 MiB outside
    close(peak, 4 * MB)
    _, nothing = peak_bytes(lambda: None)
    assert nothing == 0


def test_sequential_temporaries_do_not_add_up():
    def fn():
        for _ in range(5):
            t = torch.ones(2 * MB)  # 8 MiB, freed at the next assignment... after the new one exists
            del t
        return 0
    _, peak = peak_bytes(fn)
    close(peak, 8 * MB)


class _Temporary(torch.autograd.Function):
    """A backward that holds a 16 MiB temporary, then returns a 4 MiB gradient."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        tmp = torch.full((4 * MB,), 1.0)  # 16 MiB alive only inside the backward
        out = grad * tmp[: grad.numel()].view_as(grad)
        del tmp
        return out


def test_allocations_inside_autograd_backward_are_seen():
    x = torch.randn(MB, requires_grad=True)  # 4 MiB leaf, allocated before

    def fn():
        _Temporary.apply(x).sum().backward()

    _, peak = peak_bytes(fn)
    # forward output (4 MiB) freed after sum; backward: 16 MiB temporary + the 4 MiB gradient
    # (kept as x.grad) + the expanded ones of sum's backward (a few bytes).
    close(peak, 20 * MB)
    assert x.grad is not None


def test_threads_started_by_the_code_are_not_seen():
    """The documented blind spot: profiling is enabled on the calling thread (and autograd's) only."""
    def fn():
        worker = threading.Thread(target=lambda: torch.empty(MB).sum())
        worker.start()
        worker.join()
    _, peak = peak_bytes(fn)
    assert peak < MB


def gloo_worker():
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()

    def fn():
        a = torch.full((MB,), float(rank))                 # 4 MiB
        dist.all_reduce(a)                                 # in place
        b = torch.empty(2 * MB * (rank + 1))               # + 8 MiB x (rank + 1), this rank's own
        dist.all_reduce(a[:16])
        del b
        return float(a[0])

    return peak_bytes(fn)


@pytest.mark.parametrize("world", [2])
def test_inside_gloo_processes(world):
    results = run_distributed(gloo_worker, world, timeout=120)
    for rank, (value, peak) in enumerate(results):
        assert value == world * sum(range(world))  # reduced twice
        close(peak, 4 * MB + 8 * MB * (rank + 1))
