"""Reference formulas the cross-entropy kernel tests share (plain torch, any dtype: fp64 is the truth)."""
import torch


def cross_entropy_formula(logits, labels, scale, ignore_index=-100, reduction="mean", z_loss=0.0):
    """The loss written out in logits' dtype (fp64 for the truth, the input dtype for the baseline)."""
    x = logits * scale
    lse = torch.logsumexp(x, dim=-1)
    valid = labels != ignore_index
    target = x.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    loss = lse - target + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def loss_and_grad(fn, logits, grad_out):
    logits = logits.detach().clone().requires_grad_(True)
    loss = fn(logits)
    (grad,) = torch.autograd.grad(loss, logits, grad_out.to(loss.dtype))
    return loss.detach(), grad
