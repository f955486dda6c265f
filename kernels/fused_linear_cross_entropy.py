"""Linear layer + cross entropy without the full [tokens, vocab] logits (Liger's fused linear CE).

    loss = fused_linear_cross_entropy(hidden, weight, labels, logit_scale=1.0, ignore_index=-100,
                                      reduction="mean", z_loss=0.0, impl="auto", chunk_tokens=None)

The loss is cross_entropy(hidden @ weight.T, labels, logit_scale, ...) of megacpm.kernels.cross_entropy
(same semantics: fp32, ignore_index, mean over non-ignored tokens and 0 when there are none, optional
z-loss). hidden [..., H], weight [V, H], labels [...].

How: the tokens are split into chunks of ``chunk_tokens`` (default: as many as keep one chunk's logits
at most 2^26 elements, 256 MB in fp32); per chunk the logits are one matmul, the cross-entropy kernel
computes the loss and writes the logits' gradient in place of the logits, and that gradient gives the
chunk's hidden gradient (grad_logits @ W) and adds grad_logits^T @ hidden_chunk to an fp32 weight-gradient
accumulator. The input gradients are thus computed in the forward (when they are needed) and only
scaled by grad_output in the backward: no logits are saved. reduction="none" cannot be done that way (the
per-token output gradients are unknown in the forward): its backward recomputes the chunks instead.
The torch path (CPU) runs the same chunk loop with a PyTorch cross entropy.

Mixed precision: the matmuls run in the autocast dtype when autocast is on for the tensors' device type,
in the hidden's dtype otherwise (the weight, e.g. an fp32 master under bf16 autocast, is cast once);
autocast is switched off inside, the weight gradient is accumulated in fp32 and returned in the weight's
dtype, the hidden gradient in the hidden's dtype, the loss is fp32.
"""
from __future__ import annotations

from typing import Optional

import torch

from megacpm.kernels.cross_entropy import (REDUCTIONS, _ce_forward, torch_ce_forward_and_grad_,
                                          torch_cross_entropy_rows)
from megacpm.kernels.dispatch import use_triton

# Logits elements alive at once by default (256 MB in fp32). With the chunk's logits and their
# in-place gradient this keeps the loss's peak near 0.3x the materialised one at vocab 122,753.
MAX_CHUNK_ELEMENTS = 1 << 26


def default_chunk_tokens(tokens: int, vocab: int) -> int:
    return max(1, min(tokens, MAX_CHUNK_ELEMENTS // max(vocab, 1)))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _chunk_loop(hidden, weight, labels, grad_rows, scale, ignore_index, z_loss, chunk, triton_path, dtype,
                need_hidden_grad, need_weight_grad):
    """One pass over the token chunks: per-row fp32 losses and the gradients of sum(grad_rows * loss)
    with respect to hidden (hidden's dtype) and weight (fp32), each None when not needed."""
    tokens = hidden.shape[0]
    want_grad = need_hidden_grad or need_weight_grad
    h_all = hidden.to(dtype)
    w = weight.to(dtype)
    losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
    per_row = grad_rows is not None and grad_rows.ndim == 1 and grad_rows.shape[0] == tokens
    if grad_rows is None:
        grad_rows = torch.ones((), dtype=torch.float32, device=hidden.device)
    for start in range(0, tokens, chunk):
        end = min(start + chunk, tokens)
        h = h_all[start:end]
        y = labels[start:end]
        g_rows = grad_rows[start:end] if per_row else grad_rows
        logits = h @ w.t()  # [c, V] in the compute dtype
        grad_logits = None
        if triton_path:
            loss, _ = _ce_forward(logits, y, scale, ignore_index, z_loss, grad_rows=g_rows if want_grad else None)
            grad_logits = logits
        elif want_grad:
            loss, grad_logits = torch_ce_forward_and_grad_(logits, y, scale, ignore_index, z_loss, g_rows)
            grad_logits = grad_logits.to(dtype)
        else:
            loss = torch_cross_entropy_rows(logits, y, scale, ignore_index, z_loss)
        losses[start:end] = loss
        if need_hidden_grad:
            grad_hidden[start:end] = grad_logits @ w
        if need_weight_grad:
            if grad_logits.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), h)
            else:
                grad_weight += grad_logits.t() @ h
        del logits, grad_logits
    return losses, grad_hidden, grad_weight


def _reduce(losses, labels, ignore_index, reduction):
    if reduction == "sum":
        return losses.sum()
    count = (labels != ignore_index).sum().clamp(min=1)
    return losses.sum() / count.to(torch.float32)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, ignore_index, reduction, z_loss, chunk, triton_path, dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.reduction = reduction
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            if reduction == "none":
                losses, _, _ = _chunk_loop(hidden, weight, labels, None, scale, ignore_index, z_loss, chunk,
                                           triton_path, dtype, False, False)
                ctx.save_for_backward(hidden, weight, labels)
                ctx.args = (scale, ignore_index, z_loss, chunk, triton_path, dtype)
                return losses
            grad_rows = None
            if need_h or need_w:
                if reduction == "sum":
                    grad_rows = torch.ones((), dtype=torch.float32, device=hidden.device)
                else:
                    count = (labels != ignore_index).sum().clamp(min=1)
                    grad_rows = 1.0 / count.to(torch.float32)
            losses, grad_hidden, grad_weight = _chunk_loop(
                hidden, weight, labels, grad_rows, scale, ignore_index, z_loss, chunk, triton_path, dtype,
                need_h, need_w)
            if grad_weight is not None:
                grad_weight = grad_weight.to(weight.dtype)
            # Kept on ctx, not saved for backward: these are results, not inputs, and the backward
            # scales them in place and lets go of them, so no second weight-sized copy ever exists.
            ctx.grads = (grad_hidden, grad_weight)
            return _reduce(losses, labels, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, labels = ctx.saved_tensors
            scale, ignore_index, z_loss, chunk, triton_path, dtype = ctx.args
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                _, grad_hidden, grad_weight = _chunk_loop(
                    hidden, weight, labels, grad_output.float(), scale, ignore_index, z_loss, chunk,
                    triton_path, dtype, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            if grad_weight is not None:
                grad_weight = grad_weight.to(weight.dtype)
        else:
            if ctx.grads is None:
                raise RuntimeError("fused_linear_cross_entropy: backward called twice (the gradients "
                                   "computed in the forward are consumed by the first backward)")
            grad_hidden, grad_weight = ctx.grads
            ctx.grads = None
            if grad_hidden is not None:
                grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
            if grad_weight is not None:
                grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               logit_scale: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                               z_loss: float = 0.0, impl: str = "auto",
                               chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """cross_entropy((hidden @ weight.T) * logit_scale, labels) without the full logits (module docstring)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    assert weight.ndim == 2 and hidden.shape[-1] == weight.shape[1], \
        f"hidden {tuple(hidden.shape)} does not match weight {tuple(weight.shape)}"
    assert labels.shape == hidden.shape[:-1], f"labels {tuple(labels.shape)} vs hidden {tuple(hidden.shape)}"
    assert not labels.dtype.is_floating_point
    lead = labels.shape
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    tokens, vocab = hidden2d.shape[0], weight.shape[0]
    chunk = int(chunk_tokens) if chunk_tokens else default_chunk_tokens(tokens, vocab)
    assert chunk >= 1
    triton_path = use_triton(impl, hidden, weight, labels)
    loss = FusedLinearCrossEntropyFunction.apply(hidden2d, weight, labels1d, float(logit_scale), int(ignore_index),
                                                 reduction, float(z_loss), chunk, triton_path,
                                                 _compute_dtype(hidden))
    return loss.reshape(lead) if reduction == "none" else loss
