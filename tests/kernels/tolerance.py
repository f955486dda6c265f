"""The kernel tests' tolerance rule (docs/design-notes.md, "Kernels").

A kernel's error against an fp64 truth must be at most a small multiple (``factor``) of PyTorch's own
error computing the same thing in the same dtype, plus a small ``atol``; NaN (or inf where the truth
is finite) never passes. Errors are max-abs over the whole tensor.
"""
from __future__ import annotations

from typing import Optional

import torch


def max_abs_error(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """max |out - ref64| computed in fp64; inf when out has a NaN/inf where ref64 is finite."""
    out64 = out.detach().to(torch.float64)
    ref64 = ref64.detach().to(torch.float64)
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    if out64.numel() == 0:
        return 0.0
    if not torch.isfinite(out64[torch.isfinite(ref64)]).all():
        return float("inf")
    if not torch.isfinite(ref64).all():
        raise AssertionError("the fp64 reference itself is not finite: the test is wrong")
    return (out64 - ref64).abs().max().item()


def assert_close_to_reference(out: torch.Tensor, ref64: torch.Tensor, torch_out: Optional[torch.Tensor] = None,
                              factor: float = 2.0, atol: float = 1e-6, name: str = "output") -> None:
    """Assert error(out) <= factor * error(torch_out) + atol, both errors against ``ref64``.

    ``torch_out`` is PyTorch computing the same thing in the same dtype (the baseline); without it
    only ``error(out) <= atol`` is required. NaN in ``out`` never passes; neither does a NaN in
    ``torch_out`` silently widening the bound.
    """
    if torch.isnan(out.detach()).any():
        raise AssertionError(f"{name}: NaN in the output")
    err = max_abs_error(out, ref64)
    base = 0.0
    if torch_out is not None:
        if torch.isnan(torch_out.detach()).any():
            raise AssertionError(f"{name}: NaN in the PyTorch baseline")
        base = max_abs_error(torch_out, ref64)
    bound = factor * base + atol
    if not err <= bound:
        raise AssertionError(f"{name}: max abs error {err:.3e} > {factor} x PyTorch's {base:.3e} + atol {atol:.1e} "
                             f"(dtype {out.dtype}, shape {tuple(out.shape)})")


def dtype_atol(dtype: torch.dtype, scale: float = 1.0) -> float:
    """A small absolute slack for ``dtype``: a quarter of an ulp at 1, times ``scale``."""
    return 0.25 * torch.finfo(dtype).eps * scale
