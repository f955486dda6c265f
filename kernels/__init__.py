"""megacpm.kernels: hand-written Triton kernels (RMSNorm, rotary, cross entropy), with PyTorch fallbacks."""
