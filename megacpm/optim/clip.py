"""Global gradient-norm clipping in fp32."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float,
                    norm_reducer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most ``max_norm``; return the norm (fp32).

    ``norm_reducer`` receives the local sum of squares and returns the global one: model-parallel
    runs pass an all-reduce over the ranks that hold distinct parameters. A non-finite norm is
    returned as is and leaves the gradients untouched, so the caller can report the step.
    max_norm <= 0 only measures.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    device = grads[0].device
    squares = torch.stack([g.detach().float().square().sum() for g in grads]).sum().to(device)
    if norm_reducer is not None:
        squares = norm_reducer(squares)
    total = squares.sqrt()
    if max_norm > 0 and torch.isfinite(total):
        scale = max_norm / (total + 1e-6)
        if scale < 1:
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return total
