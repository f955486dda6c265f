"""Global gradient-norm clipping in fp32."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Union

import torch

Params = Union[torch.Tensor, Iterable[torch.Tensor]]


def clip_grad_norm_(parameters: Params, max_norm: float,
                    norm_reducer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most ``max_norm``; return that norm (fp32).

    Parameters without a gradient are skipped. ``norm_reducer`` maps the local sum of squares to
    the global one (model-parallel runs pass an all-reduce over the ranks holding distinct
    parameters); it is called even when this rank has no gradients, since it may be a collective.
    A non-finite norm is returned as is and leaves the gradients untouched, so the caller can
    report the step. ``max_norm <= 0`` only measures.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    by_device: Dict[torch.device, List[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_device.setdefault(p.grad.device, []).append(p.grad)
    device = next(iter(by_device), params[0].device if params else torch.device("cpu"))

    squares = torch.zeros((), dtype=torch.float32, device=device)
    for grads in by_device.values():
        # dtype=float32: bf16/fp16 gradients are accumulated in fp32, without an fp32 copy.
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        squares = squares + torch.stack(norms).square().sum().to(device)
    if norm_reducer is not None:
        squares = norm_reducer(squares)
    total = squares.sqrt()

    if max_norm > 0 and by_device:
        # Computed on the device, without a host sync: a zero norm gives inf -> 1 after the clamp,
        # a non-finite one a coefficient of exactly 1 (x * 1.0 == x, so the gradients are unchanged).
        coef = torch.clamp(max_norm / total, max=1.0)
        coef = torch.where(torch.isfinite(total), coef, torch.ones_like(coef))
        for grad_device, grads in by_device.items():
            torch._foreach_mul_(grads, coef.to(grad_device))
    return total
