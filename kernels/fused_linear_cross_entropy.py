"""Linear layer + cross entropy without the full [tokens, vocab] logits (Liger's fused linear CE), on one
rank and over a vocabulary split across a tensor-parallel group.

    loss = fused_linear_cross_entropy(hidden, weight, labels, logit_scale=1.0, ignore_index=-100,
                                      reduction="mean", z_loss=0.0, impl="auto", chunk_tokens=None)
    loss = fused_linear_vocab_parallel_cross_entropy(hidden, weight_shard, labels, group, logit_scale=1.0,
                                      ignore_index=-100, reduction="mean", vocab_start=None,
                                      valid_rows=None, chunk_tokens=None, impl="auto")

The loss is cross_entropy(hidden @ weight.T, labels, logit_scale, ...) of megacpm.kernels.cross_entropy
(same semantics: fp32, ignore_index, mean over non-ignored tokens and 0 when there are none, optional
z-loss). hidden [..., H], weight [V, H], labels [...].

How: the tokens are split into chunks of ``chunk_tokens`` (default ``default_chunk_tokens(tokens,
local_vocab)``: as many as keep one chunk's logits at most 2^26 elements, 256 MB in fp32 -- the one
chunking rule of the LM head at every tensor-parallel size); per chunk the logits are one matmul, the
cross-entropy kernel computes the loss and writes the logits' gradient in place of the logits, and that
gradient gives the chunk's hidden gradient (grad_logits @ W) and adds grad_logits^T @ hidden_chunk to an
fp32 weight-gradient accumulator. The input gradients are thus computed in the forward (when they are
needed) and only scaled by grad_output in the backward: no logits are saved. reduction="none" cannot be
done that way (the per-token output gradients are unknown in the forward): its forward computes the
per-token losses only (no gradients) and its backward runs the chunk loop again with the per-token
grad_output, on one rank and vocabulary-parallel alike (one more logits matmul per chunk; for DPO's
per-sequence sums of log-probabilities). The torch path (CPU) runs the same chunk loop with a PyTorch
cross entropy.

Vocabulary-parallel (``fused_linear_vocab_parallel_cross_entropy``): the same chunk loop, where a chunk's
loss needs the whole vocabulary: per chunk the local row statistics of the logits shard (max, sum of
exp, target logit: the Triton row-stats kernel of megacpm.kernels.cross_entropy, or its torch twin), the
two all-reduces of vocab_parallel_cross_entropy (MAX of the row maxima, then SUM of the rescaled sums and
target logits), the global lse and loss, then the logits' gradient in place (Triton: the CE backward
kernel with a column offset; torch: from the exp(x - max) the statistics left in the logits' buffer).
With reduction="none" the forward's pass makes the two all-reduces per chunk and no gradient, and the
backward's pass makes them again: every rank of the group must run the backward (as any
tensor-parallel backward), so that the collectives match.

Mixed precision: the matmuls run in the autocast dtype when autocast is on for the tensors' device type,
in the hidden's dtype otherwise (the weight, e.g. an fp32 master under bf16 autocast, is cast once);
autocast is switched off inside, the weight gradient is accumulated in fp32 and returned in the weight's
dtype, the hidden gradient in the hidden's dtype, the loss is fp32.

Memory: ``fused_linear_cross_entropy_workspace_bytes`` gives the bytes the path holds at its peak beyond
its inputs (tested against a CPU measurement in tests/kernels/test_fused_linear_ce_memory.py).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from megacpm.kernels.cross_entropy import (REDUCTIONS, ce_backward, ce_forward, reduce_rows, row_stats,
                                          torch_ce_forward_and_grad_, torch_cross_entropy_rows,
                                          torch_row_stats_, torch_shard_grad_)
from megacpm.kernels.dispatch import use_triton

# Logits elements alive at once by default (256 MB in fp32). With the chunk's logits and their
# in-place gradient this keeps the loss's peak near 0.3x the materialised one at vocab 122,753.
MAX_CHUNK_ELEMENTS = 1 << 26


def default_chunk_tokens(tokens: int, local_vocab: int) -> int:
    """Tokens per chunk: one chunk's logits [chunk, local_vocab] hold at most MAX_CHUNK_ELEMENTS.

    ``local_vocab`` is this rank's rows of the output weight (padding included, so that every rank of a
    tensor-parallel group picks the same chunk and runs the same collectives)."""
    return max(1, min(tokens, MAX_CHUNK_ELEMENTS // max(local_vocab, 1)))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


class _Shard(NamedTuple):
    """This rank's part of a vocabulary split over ``group``: global ids [vocab_start, vocab_start + valid)."""
    group: object
    vocab_start: int
    local_vocab: int


def _shard_chunk(logits, labels, all_labels, grad_rows, scale, ignore_index, triton_path, shard, first):
    """Loss rows of one token chunk over the whole (split) vocabulary, and the gradient of
    sum(grad_rows * loss) with respect to this rank's logits, in place of them (None without grad_rows).
    Exactly two all-reduces (MAX, then SUM) over ``shard.group``; the first chunk's MAX also carries
    the end of this rank's vocabulary and +-local_vocab (a free check of the labels and of equal shards)."""
    rows, n_cols = logits.shape
    col_offset = shard.vocab_start
    e = None
    if n_cols == 0:  # a rank with only padding rows
        m_local = torch.full((rows,), float("-inf"), dtype=torch.float32, device=logits.device)
        d_local = torch.zeros(rows, dtype=torch.float32, device=logits.device)
        t_local = torch.zeros(rows, dtype=torch.float32, device=logits.device)
    elif triton_path:
        m_local, d_local, t_local = row_stats(logits, labels, scale, ignore_index, col_offset)
    else:
        m_local, d_local, t_local, e = torch_row_stats_(logits, labels, scale, ignore_index, col_offset)
    check = first and not logits.is_cuda  # checked where it costs no device sync
    vocab_end = float(col_offset + n_cols) if n_cols else 0.0  # a rank of only padding ends nothing
    extra = [vocab_end, float(shard.local_vocab), -float(shard.local_vocab)] if check else []
    maxes = torch.cat([m_local, m_local.new_tensor(extra)])
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=shard.group)
    m = maxes[:rows]
    if check:
        vocab_end, high, low = maxes[rows:].tolist()
        if high != -low:
            raise ValueError(f"fused_linear_vocab_parallel_cross_entropy needs weight shards of equal rows; "
                             f"got between {-low:.0f} and {high:.0f}")
        bad = (all_labels != ignore_index) & ((all_labels < 0) | (all_labels >= int(vocab_end)))
        if bool(bad.any()):
            raise IndexError(f"label {int(all_labels[bad][0])} out of range for vocabulary {int(vocab_end)}")
    sums = torch.stack([d_local * torch.exp(m_local - m), t_local])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=shard.group)
    lse = m + torch.log(sums[0])
    valid = labels != ignore_index
    loss = torch.where(valid, lse - sums[1], torch.zeros_like(lse))
    if grad_rows is None:
        return loss, None
    if n_cols == 0:
        return loss, logits
    if triton_path:
        return loss, ce_backward(logits, labels, lse, grad_rows, scale, ignore_index, 0.0, col_offset,
                                 grad_out=logits)
    return loss, torch_shard_grad_(e, labels, m_local, lse, grad_rows, scale, ignore_index, col_offset)


def _chunk_loop(hidden, weight, labels, grad_rows, scale, ignore_index, z_loss, chunk, triton_path, dtype,
                need_hidden_grad, need_weight_grad, valid_rows=None, shard=None):
    """One pass over the token chunks: per-row fp32 losses and the gradients of sum(grad_rows * loss)
    with respect to hidden (hidden's dtype) and weight (fp32), each None when not needed.

    ``grad_rows``: None (no gradient wanted), fp32 0-d (the same factor for every row) or [tokens] (one
    per row: reduction "none"'s backward). Only the first ``valid_rows`` rows of ``weight`` are vocabulary
    (the rest get no logits and a zero gradient). ``shard`` None: the whole vocabulary is here; else this
    rank's part of it (_Shard), and the hidden gradient is this rank's partial contribution; the
    collectives run per chunk whether or not gradients are wanted."""
    tokens = hidden.shape[0]
    valid = weight.shape[0] if valid_rows is None else int(valid_rows)
    assert shard is None or z_loss == 0.0
    want_grad = need_hidden_grad or need_weight_grad
    h_all = hidden.to(dtype)
    w = weight[:valid].to(dtype)
    losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
    grad_weight_valid = grad_weight[:valid] if need_weight_grad else None  # a view: padding rows stay 0
    hidden_out = need_hidden_grad and grad_hidden.dtype == dtype and grad_hidden.is_contiguous()
    per_row = grad_rows is not None and grad_rows.ndim == 1 and grad_rows.shape[0] == tokens
    if grad_rows is None:
        grad_rows = torch.ones((), dtype=torch.float32, device=hidden.device)
    for start in range(0, tokens, chunk):
        end = min(start + chunk, tokens)
        h = h_all[start:end]
        y = labels[start:end]
        g_rows = grad_rows[start:end] if per_row else grad_rows
        logits = h @ w.t()  # [c, valid] in the compute dtype
        grad_logits = None
        if shard is not None:
            loss, grad_logits = _shard_chunk(logits, y, labels, g_rows if want_grad else None, scale,
                                             ignore_index, triton_path, shard, start == 0)
            del logits  # the gradient is in its buffer, or (torch, not fp32) in an fp32 one
            if grad_logits is not None and grad_logits.dtype != dtype:
                grad_logits = grad_logits.to(dtype)
        elif triton_path:
            loss, _ = ce_forward(logits, y, scale, ignore_index, z_loss, grad_rows=g_rows if want_grad else None)
            grad_logits = logits
        elif want_grad:
            loss, grad_logits = torch_ce_forward_and_grad_(logits, y, scale, ignore_index, z_loss, g_rows)
            del logits
            grad_logits = grad_logits.to(dtype)
        else:
            loss = torch_cross_entropy_rows(logits, y, scale, ignore_index, z_loss)
        losses[start:end] = loss
        if need_hidden_grad:
            if hidden_out:  # straight into the rows of grad_hidden: no [c, H] temporary
                torch.mm(grad_logits, w, out=grad_hidden[start:end])
            else:
                grad_hidden[start:end] = grad_logits @ w
        if need_weight_grad:
            if grad_logits.dtype == torch.float32:
                grad_weight_valid.addmm_(grad_logits.t(), h)
            else:
                grad_weight_valid += grad_logits.t() @ h
        logits = grad_logits = None  # before the next chunk's logits exist: one chunk alive at a time
    return losses, grad_hidden, grad_weight


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, ignore_index, reduction, z_loss, chunk, triton_path, dtype,
                valid_rows=None, shard=None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.reduction = reduction
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            if reduction == "none":
                # No gradients here (the per-token grad_output is not known yet): the backward recomputes.
                losses, _, _ = _chunk_loop(hidden, weight, labels, None, scale, ignore_index, z_loss, chunk,
                                           triton_path, dtype, False, False, valid_rows, shard)
                ctx.save_for_backward(hidden, weight, labels)
                ctx.args = (scale, ignore_index, z_loss, chunk, triton_path, dtype, valid_rows, shard)
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
                need_h, need_w, valid_rows, shard)
            if grad_weight is not None:
                grad_weight = grad_weight.to(weight.dtype)
            # Kept on ctx, not saved for backward: these are results, not inputs, and the backward
            # scales them in place and lets go of them, so no second weight-sized copy ever exists.
            ctx.grads = (grad_hidden, grad_weight)
            return reduce_rows(losses, labels, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, labels = ctx.saved_tensors
            scale, ignore_index, z_loss, chunk, triton_path, dtype, valid_rows, shard = ctx.args
            # The per-token output gradient as fp32 [tokens] (an expanded one, e.g. of a .sum(), keeps its
            # stride 0: the kernels take any row stride).
            grad_rows = grad_output.reshape(-1).float()
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                _, grad_hidden, grad_weight = _chunk_loop(
                    hidden, weight, labels, grad_rows, scale, ignore_index, z_loss, chunk, triton_path,
                    dtype, ctx.needs_input_grad[0], ctx.needs_input_grad[1], valid_rows, shard)
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
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None, None


def _check_shapes(hidden, weight, labels):
    assert weight.ndim == 2 and hidden.shape[-1] == weight.shape[1], \
        f"hidden {tuple(hidden.shape)} does not match weight {tuple(weight.shape)}"
    assert labels.shape == hidden.shape[:-1], f"labels {tuple(labels.shape)} vs hidden {tuple(hidden.shape)}"
    assert not labels.dtype.is_floating_point


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               logit_scale: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                               z_loss: float = 0.0, impl: str = "auto",
                               chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """cross_entropy((hidden @ weight.T) * logit_scale, labels) without the full logits (module docstring)."""
    return _fused(hidden, weight, labels, logit_scale, ignore_index, reduction, z_loss, impl, chunk_tokens)


def _fused(hidden, weight, labels, logit_scale, ignore_index, reduction, z_loss, impl, chunk_tokens,
           valid_rows=None, shard=None):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_shapes(hidden, weight, labels)
    lead = labels.shape
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    tokens, local_vocab = hidden2d.shape[0], weight.shape[0]
    chunk = int(chunk_tokens) if chunk_tokens else default_chunk_tokens(tokens, local_vocab)
    assert chunk >= 1
    triton_path = use_triton(impl, hidden, weight, labels)
    loss = FusedLinearCrossEntropyFunction.apply(hidden2d, weight, labels1d, float(logit_scale), int(ignore_index),
                                                 reduction, float(z_loss), chunk, triton_path,
                                                 _compute_dtype(hidden), valid_rows, shard)
    return loss.reshape(lead) if reduction == "none" else loss


def fused_linear_vocab_parallel_cross_entropy(hidden: torch.Tensor, weight_shard: torch.Tensor,
                                              labels: torch.Tensor, group: Optional[dist.ProcessGroup],
                                              logit_scale: float = 1.0, ignore_index: int = -100,
                                              reduction: str = "mean", vocab_start: Optional[int] = None,
                                              valid_rows: Optional[int] = None,
                                              chunk_tokens: Optional[int] = None,
                                              impl: str = "auto") -> torch.Tensor:
    """The LM head's loss with the output weight split by vocabulary rows over ``group`` (tensor parallel),
    chunked over tokens, the gradients computed in the forward: no [tokens, vocab / tp] logits are kept.

    hidden [..., H] is the same on every rank; weight_shard [V_local, H] (the same V_local on every rank)
    is this rank's contiguous rows of the output weight, the global ids [vocab_start, vocab_start +
    valid_rows) (defaults: rank * V_local and V_local); rows from ``valid_rows`` on are padding (a
    vocabulary that tp does not divide): probability zero, no loss, zero gradient. labels [...] are
    global ids, the same on every rank. Returns the fp32 loss, the same on every rank: cross_entropy of
    (hidden @ W_full.T) * logit_scale over the real vocabulary, "mean" over non-ignored tokens (0 when
    there are none), "sum", or "none": the per-token losses, shaped like ``labels``, 0 at
    ignore_index (minus the per-token log-probabilities of the labels, e.g. summed per sequence by DPO).

    Gradients: weight_shard gets its rows of the full weight gradient (padding rows 0). hidden gets this
    rank's PARTIAL contribution grad_logits_shard @ weight_shard -- the sum over the group is the full
    gradient, exactly like F.linear's input gradient under tensor parallelism: the caller enters
    ``hidden`` through an identity-forward / all-reduce-backward mapping (Megatron's copy_to_tp). With
    "none" the gradients are those of sum(grad_output * losses) for the per-token grad_output, computed
    in the backward by recomputing the chunks (the forward computes only the losses; both passes make
    the two all-reduces per chunk, so every rank must run the backward).

    Per token chunk (``chunk_tokens``, default ``default_chunk_tokens(tokens, V_local)``): the logits
    shard in the compute dtype (the autocast dtype or hidden's), the local row statistics (the Triton
    row-stats kernel, or torch), two all-reduces (MAX, SUM) over ``group``, then the logits' gradient in
    place, grad_hidden_chunk = grad_logits @ w and grad_weight (fp32 accumulator) += grad_logits.T @ h.
    ``group`` None or of size 1 is exactly ``fused_linear_cross_entropy`` (on the first ``valid_rows`` rows;
    note: None means no tensor parallelism here, not the default group).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_shapes(hidden, weight_shard, labels)
    local_vocab = weight_shard.shape[0]
    valid = local_vocab if valid_rows is None else int(valid_rows)
    if not 0 <= valid <= local_vocab:
        raise ValueError(f"valid_rows must be in [0, {local_vocab}], got {valid}")
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        if vocab_start not in (None, 0):
            raise ValueError(f"a single rank holds the vocabulary from id 0, got vocab_start={vocab_start}")
        if valid == 0:
            raise ValueError("a single rank needs at least one vocabulary row")
        return _fused(hidden, weight_shard, labels, logit_scale, ignore_index, reduction, 0.0, impl, chunk_tokens,
                      valid_rows=None if valid == local_vocab else valid)
    rank = dist.get_rank(group)
    start = rank * local_vocab if vocab_start is None else int(vocab_start)
    if start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {start}")
    return _fused(hidden, weight_shard, labels, logit_scale, ignore_index, reduction, 0.0, impl, chunk_tokens,
                  valid_rows=valid, shard=_Shard(group, start, local_vocab))


def fused_linear_cross_entropy_workspace_bytes(tokens: int, hidden_size: int, local_vocab: int,
                                               compute_dtype: torch.dtype, hidden_dtype: torch.dtype,
                                               weight_dtype: torch.dtype, chunk_tokens: Optional[int] = None,
                                               triton_path: bool = False, *, valid_rows: Optional[int] = None) -> int:
    """Bytes the fused path (forward + backward, both gradients wanted, reduction "mean" or "sum") holds at
    its peak beyond its inputs, for T = ``tokens``, H = ``hidden_size``, V = ``local_vocab`` (this rank's
    weight rows, padding included), Vr = ``valid_rows`` (default V) real rows, c = the chunk (default
    ``default_chunk_tokens(T, V)``), L = c * Vr logits elements per chunk; b(x) is x's element size and
    cd the compute dtype. The same whether the vocabulary is split over ranks or not.

    Held for the whole forward (P):
      4 V H            the fp32 weight-gradient accumulator (zeros, padding rows included)
      b(hidden) T H    the hidden gradient (hidden's dtype)
      4 T              the per-row fp32 losses
      b(cd) T H        hidden cast to the compute dtype, when hidden's dtype is not cd
      b(cd) Vr H       the real weight rows cast to the compute dtype, when the weight's dtype is not cd
    One chunk at a time, on top of P, the largest of these moments:
      A  computing the statistics:  Triton: b(cd) L (the logits; gradient written in place).
                                    torch (one rank or vocab-parallel): the logits b(cd) L, plus their
                                    fp32 copy 4 L when cd is not fp32 (in place when it is; the
                                    statistics leave exp(x - max) in that buffer: no temporary).
      B  torch, cd not fp32: the fp32 gradient 4 L and its cast to cd b(cd) L (the logits freed).
      C  the matmuls: the gradient b(cd) L, plus the larger of the hidden-gradient product b(cd) c H
         (only when hidden's dtype is not cd; else it is written into the hidden gradient) and the
         weight-gradient product b(cd) Vr H (only when cd is not fp32; else addmm into the accumulator).
    After the loop (E): when the weight's dtype is not fp32, the gradient's cast b(weight) V H while the
    accumulator 4 V H, the hidden gradient and the losses are alive (the cast copies are freed).
    Returns max(P + max(A, B, C), E). Per-row fp32 vectors of a chunk (lse, maxima, the collectives'
    buffers: a few x 4 c bytes) are left out. The backward only scales these gradients in place.
    """
    size = lambda dtype: torch.empty((), dtype=dtype).element_size()  # noqa: E731
    T, H, V = int(tokens), int(hidden_size), int(local_vocab)
    Vr = V if valid_rows is None else int(valid_rows)
    c = int(chunk_tokens) if chunk_tokens else default_chunk_tokens(T, V)
    c = min(c, T)
    cb, hb, wb = size(compute_dtype), size(hidden_dtype), size(weight_dtype)
    low = compute_dtype != torch.float32
    L = c * Vr
    persistent = 4 * V * H + hb * T * H + 4 * T
    persistent += cb * T * H if hidden_dtype != compute_dtype else 0
    persistent += cb * Vr * H if weight_dtype != compute_dtype else 0
    a = cb * L if triton_path else cb * L + (4 * L if low else 0)
    b = (4 + cb) * L if (low and not triton_path) else 0
    c_moment = cb * L + max(cb * c * H if hidden_dtype != compute_dtype else 0, cb * Vr * H if low else 0)
    end = 4 * V * H + hb * T * H + 4 * T + (wb * V * H if weight_dtype != torch.float32 else 0)
    return int(max(persistent + max(a, b, c_moment), end))
