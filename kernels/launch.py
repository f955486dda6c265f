"""Launch settings every kernel of megacpm.kernels uses: block sizes, num_warps, and the bf16 rounding flag.

One rule for all kernels (cross entropy, RMSNorm, rotary), so that a tuning change is made in one place:

- ``launch_settings(n, max_block=None, min_block=MIN_BLOCK, rows=1) -> (BLOCK, num_warps)``: BLOCK is the
  next power of two >= n (at least ``min_block``). Kernels that loop over a row in blocks (cross entropy
  over the vocabulary) pass ``max_block`` and get BLOCK capped there; kernels that hold a whole row in one
  block (RMSNorm) pass none and get a ValueError above MAX_SINGLE_BLOCK. ``rows`` is the number of rows
  of a 2-D tile (rotary: BLOCK_H heads x BLOCK_D half-dims) so num_warps follows the tile's elements.
- ``num_warps_for(elements)``: 4 below 2048 elements per program, 8 from 2048, 16 from 8192, 32 from 32768.
- ``round_bf16()``: the value of every kernel's ``ROUND_BF16`` constexpr, the flag of
  megacpm.kernels.casting.cast_rne: True under Triton's CPU interpreter (whose fp32 -> bf16 cast
  truncates, so bf16 stores are rounded to nearest even by hand), False on a GPU (native cast).

Nothing here imports triton: the settings are plain integers.
"""
from __future__ import annotations

from typing import Optional, Tuple

from .dispatch import interpreter_enabled

MIN_BLOCK = 16  # the smallest block a row kernel is launched with (fewer compiled variants)
MAX_SINGLE_BLOCK = 65536  # the largest row a one-block kernel (RMSNorm) takes


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1); as triton.next_power_of_2."""
    return 1 << max(int(n) - 1, 0).bit_length()


def num_warps_for(elements: int) -> int:
    """num_warps for a program that works on ``elements`` values at a time (a power-of-two block or tile)."""
    if elements >= 32768:
        return 32
    if elements >= 8192:
        return 16
    if elements >= 2048:
        return 8
    return 4


def launch_settings(n: int, max_block: Optional[int] = None, min_block: int = MIN_BLOCK, rows: int = 1,
                    what: str = "kernel") -> Tuple[int, int]:
    """(BLOCK, num_warps) for a program covering ``n`` elements of a row (see the module docstring)."""
    block = max(int(min_block), next_power_of_2(n))
    if max_block is not None:
        block = min(block, int(max_block))
    elif block > MAX_SINGLE_BLOCK:
        raise ValueError(f"{what}: a row of {n} elements is larger than the largest supported block "
                         f"({MAX_SINGLE_BLOCK})")
    return block, num_warps_for(block * int(rows))


def round_bf16() -> bool:
    """The ``ROUND_BF16`` constexpr of every kernel that stores through cast_rne (module docstring)."""
    return interpreter_enabled()
