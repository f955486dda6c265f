"""Round-to-nearest-even stores that are also correct under Triton's CPU interpreter.

The interpreter's fp32 -> bf16 cast truncates (up to 1 ulp off), while torch and a GPU round to
nearest even. Kernels store through ``cast_rne(x, DTYPE, ROUND_BF16)`` and their launchers pass
``ROUND_BF16=round_bf16()`` (megacpm.kernels.launch): under the interpreter bf16 is rounded by hand on the bit
pattern, on a GPU the native cast is used unchanged.
"""
from .dispatch import tl, triton

if triton is not None:

    @triton.jit
    def cast_rne(x, DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
        """x (fp32) cast to DTYPE, rounding to nearest even; NaN keeps the native cast."""
        if ROUND_BF16 and DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            exact = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
            return tl.where(x == x, exact, x.to(tl.bfloat16))
        else:
            return x.to(DTYPE)
