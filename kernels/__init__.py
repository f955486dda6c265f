"""megacpm.kernels: hand-written Triton kernels with PyTorch implementations for the CPU.

Every function takes ``impl="auto" | "triton" | "torch"`` (see megacpm.kernels.dispatch) and is
differentiable.
"""
