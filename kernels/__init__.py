"""megacpm.kernels: hand-written Triton kernels with PyTorch implementations for the CPU.

Every function takes ``impl="auto" | "triton" | "torch"`` (see megacpm.kernels.dispatch) and is
differentiable.
"""
from megacpm.kernels.rms_norm import rms_norm  # noqa: E402,F401
from megacpm.kernels.rotary import rotary  # noqa: E402,F401
from megacpm.kernels.cross_entropy import cross_entropy  # noqa: E402,F401
from megacpm.kernels.fused_linear_cross_entropy import (  # noqa: E402,F401
    fused_linear_cross_entropy, fused_linear_cross_entropy_workspace_bytes,
    fused_linear_vocab_parallel_cross_entropy)
from megacpm.kernels.vocab_parallel_cross_entropy import vocab_parallel_cross_entropy  # noqa: E402,F401
from megacpm.kernels.grouped_gemm import grouped_matmul  # noqa: E402,F401
