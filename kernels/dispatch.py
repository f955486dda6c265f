"""Which implementation a kernel call uses: ``impl="auto" | "triton" | "torch"``.

"auto" picks Triton when the tensors live on CUDA, or when TRITON_INTERPRET=1 (Triton's CPU
interpreter, how the kernels are tested without a GPU), and the PyTorch implementation otherwise.
The environment is read at call time; nothing here is cached or mutable.
"""
from __future__ import annotations

import os

import torch

try:  # optional: every kernel has a PyTorch implementation that needs nothing from triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

IMPLS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton kernels load and store


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    return triton is not None


def use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    """True when this call should run the Triton kernel; raises on an impossible request."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    runnable = triton_available() and (on_cuda or interpreter_enabled())
    if impl == "triton":
        if not runnable:
            raise RuntimeError(
                "impl='triton' needs the triton package and CUDA tensors (or TRITON_INTERPRET=1 "
                "set before triton is imported, for the CPU interpreter)"
            )
        return True
    return runnable
