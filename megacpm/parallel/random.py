"""Random numbers inside tensor-parallel regions (Megatron's RNG tracker, made recompute-safe).

Dropout on activations that TP splits (attention probabilities, heads differ per rank) must draw
independent masks on each TP rank, while everything replicated across TP must draw identically, or
the replicas drift apart. Megatron keeps a second, per-rank generator state for the first kind and
has to save it in checkpoints and replay it around activation recomputation.

Here the per-rank stream is derived instead of stored: entering ``tensor_parallel_rng`` draws one
number from the default generator (the same draw on every TP rank, so the default streams stay in
step), mixes it with the TP rank and seeds a forked generator from that. Nothing extra is kept: a
checkpoint's RNG states already restore the default generator, and torch.utils.checkpoint restores
it before recomputing a layer, so the recomputed masks are the original ones.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive ranks over the seed space
_SEED_BITS = 62


def _derived_seed(draw: int, tp_rank: int) -> int:
    return (draw ^ ((tp_rank + 1) * _MIX)) % (1 << _SEED_BITS)


@contextlib.contextmanager
def tensor_parallel_rng(tp_rank: int, device: torch.device) -> Iterator[None]:
    """Within the block, the default generator (of the CPU and of ``device``) is this TP rank's own
    stream; after it, the default stream continues exactly as on every other TP rank."""
    draw = int(torch.randint(0, 1 << _SEED_BITS, (1,), dtype=torch.int64))  # advances the shared stream
    devices = [device] if device.type == "cuda" else []  # the CPU generator is always forked
    with torch.random.fork_rng(devices=devices):
        seed = _derived_seed(draw, tp_rank)
        torch.manual_seed(seed)
        yield
