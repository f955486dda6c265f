"""Context parallelism: exact causal attention over a sequence split across the cp ranks.

The split (megacpm.data.batch.shard_batch): a row of S tokens is cut into 2 * cp chunks of
c = S / (2 cp) tokens and cp rank r holds chunks r and 2cp - 1 - r (head-tail), so every rank does
the same causal work. Tokens, labels, position ids and document ids are split together; between
attentions nothing couples the ranks (every other op is per token), so attention is the one place
context parallelism lives, injected as each Attention's ``attention_fn`` by
``plan_context_parallel``. Two cores, equal in value and gradient:

- ``AllGatherAttention`` (parallel.cp_attention "all_gather"): K and V all-gathered over the cp
  group (the backward reduce-scatters dK and dV), then each local chunk attends the global prefix
  ending with it under a bottom-right-aligned causal mask. (cp - 1) / cp of a layer's K and V
  arrive per rank; simple, and the default.
- ``RingAttention`` ("ring"): K and V pass peer to peer around the cp ranks, the next block's
  transfer in flight while the current one is computed; the partial outputs merge by their
  log-sum-exp (out = sum_i out_i exp(lse_i - lse), fp32), and the backward passes the blocks
  around again with their dK, dV accumulating until they return to their owner. No rank ever
  holds more than two blocks of K and V. The block kernel here is PyTorch's, in fp32 (or the inputs' wider dtype).

Document masks (packed data) hold under both: the document ids are all-gathered once per call
(int ids: a few bytes per token). RoPE needs nothing from here: position ids are global and the
model sizes its tables by the global length (``MiniCPM.context_shards``).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, get_args

import torch
import torch.distributed as dist

from megacpm.config.schema import CpAttention
from megacpm.data.batch import context_parallel_index, head_tail_chunks
from megacpm.model.attention import attention_at_end, repeat_kv
from megacpm.model.minicpm import Attention
from megacpm.parallel.mappings import Group, _all_gather, gather_from_sp, group_size

CP_ATTENTION = get_args(CpAttention)  # parallel.cp_attention's choices


def global_order(cp: int) -> torch.Tensor:
    """int64 [2 cp]: for each global chunk g, its place among the all-gathered chunks (rank r
    contributes its two chunks at places 2r and 2r + 1)."""
    place = [0] * (2 * cp)
    for rank in range(cp):
        for slot, chunk in enumerate(head_tail_chunks(rank, cp)):
            place[chunk] = 2 * rank + slot
    return torch.tensor(place)


def _to_global(gathered: torch.Tensor, cp: int) -> torch.Tensor:
    """[b, S, ...] in the ranks' (head-tail) order -> the sequence order."""
    chunks = gathered.unflatten(1, (2 * cp, gathered.shape[1] // (2 * cp)))
    return chunks.index_select(1, global_order(cp).to(gathered.device)).flatten(1, 2)


def gather_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's tokens [b, S / cp, ...] -> the whole sequence [b, S, ...] in order; the backward
    reduce-scatters the gradient back to each rank's tokens."""
    return _to_global(gather_from_sp(x, group), group_size(group))


def gather_ids(ids: torch.Tensor, group: Group) -> torch.Tensor:
    """The same as gather_sequence for integer ids (no gradient)."""
    return _to_global(_all_gather(ids, 1, group), group_size(group))


def _check_no_dropout(dropout_p: float) -> None:
    if dropout_p > 0:
        raise ValueError("attention dropout under context parallelism is not supported "
                         "(model.attention_dropout must be 0 with parallel.cp > 1)")


class AllGatherAttention:
    """attention_fn under cp > 1: all-gather K and V, one attention per local chunk against the
    global prefix ending with it."""

    communicates = True  # collectives inside: train.compile leaves it eager

    def __init__(self, group: Group, impl: str = "auto"):
        self.group, self.impl = group, impl
        self.cp = group_size(group)
        self.rank = dist.get_rank(group) if self.cp > 1 else 0

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                 document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_no_dropout(dropout_p)
        k_all, v_all = gather_sequence(k, self.group), gather_sequence(v, self.group)
        docs_all = None if document_ids is None else gather_ids(document_ids, self.group)
        chunk = q.shape[1] // 2
        outputs = []
        for slot, global_chunk in enumerate(head_tail_chunks(self.rank, self.cp)):
            mine, end = slice(slot * chunk, (slot + 1) * chunk), (global_chunk + 1) * chunk
            outputs.append(attention_at_end(
                q[:, mine], k_all[:, :end], v_all[:, :end], self.impl, 0.0,
                None if document_ids is None else document_ids[:, mine],
                None if docs_all is None else docs_all[:, :end]))
        return torch.cat(outputs, dim=1)


# -- the ring ------------------------------------------------------------------------------------
class _Ring:
    """This rank's neighbours in the cp group and the exchange of one tensor with them."""

    def __init__(self, group: Group):
        self.group = group
        ranks = dist.get_process_group_ranks(group)
        self.size = len(ranks)
        self.index = ranks.index(dist.get_rank())
        self.next, self.prev = ranks[(self.index + 1) % self.size], ranks[(self.index - 1) % self.size]

    def start(self, send: torch.Tensor) -> Tuple[torch.Tensor, List[dist.Work]]:
        """Send ``send`` to the next rank and receive the previous rank's, asynchronously (one
        batch: the pairs cannot deadlock); wait on the works before reading the result."""
        send = send.contiguous()  # held by the caller's works until they complete
        received = torch.empty_like(send)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, self.next, self.group),
                                        dist.P2POp(dist.irecv, received, self.prev, self.group)])
        return received, works

    def shift(self, send: torch.Tensor) -> torch.Tensor:
        received, works = self.start(send)
        for work in works:
            work.wait()
        return received

    def source(self, step: int) -> int:
        """The cp rank whose block this rank holds at ring step ``step``."""
        return (self.index - step) % self.size


def _allowed(q_index: torch.Tensor, k_index: torch.Tensor, q_docs: Optional[torch.Tensor],
             k_docs: Optional[torch.Tensor]) -> torch.Tensor:
    """bool [b or 1, 1, n, m]: causal by global sequence position, inside each document."""
    allowed = (k_index[None, :] <= q_index[:, None])[None, None]
    if q_docs is not None:
        allowed = allowed & (q_docs[:, :, None] == k_docs[:, None, :])[:, None]
    return allowed


def _block_scores(q, k, allowed, scale):
    return torch.matmul(q, k.transpose(-1, -2)).mul_(scale).masked_fill_(~allowed, float("-inf"))


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows that see nothing of a block) replaced by 0, so exp(s - lse) is 0 there."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _block_forward(q, k, v, allowed, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 (out [b, h, n, d], lse [b, h, n]) of q against one block of keys."""
    scores = _block_scores(q, k, allowed, scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - _finite(lse)[..., None])
    return torch.matmul(probs, v), lse


def merge_partials(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
                   block_lse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two softmax-normalised partial results over disjoint key sets, merged exactly by their
    log-sum-exps (fp32; a side that saw no key has lse -inf and weight 0)."""
    merged = torch.logaddexp(lse, block_lse)
    safe = _finite(merged)
    out = out * torch.exp(lse - safe)[..., None] + block_out * torch.exp(block_lse - safe)[..., None]
    return out, merged


class _RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_index, q_docs, docs_all, ring: _Ring, seq_len: int):
        # [b, n, h, d] -> [b, h, n, d] in at least fp32; K and V travel at their kv heads and are
        # expanded per block.
        n_heads = q.shape[2]
        compute = torch.promote_types(q.dtype, torch.float32)
        qf, kf, vf = (t.transpose(1, 2).to(compute) for t in (q, k, v))
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = torch.zeros_like(qf)
        lse = torch.full(qf.shape[:-1], float("-inf"), device=q.device, dtype=compute)
        block = torch.stack([kf, vf])
        for step in range(ring.size):
            pending = ring.start(block) if step < ring.size - 1 else None
            source = ring.source(step)
            k_index = context_parallel_index(source, ring.size, seq_len, q.device)
            allowed = _allowed(q_index, k_index, q_docs, None if docs_all is None else docs_all[:, k_index])
            block_out, block_lse = _block_forward(qf, repeat_kv_heads(block[0], n_heads),
                                                  repeat_kv_heads(block[1], n_heads), allowed, scale)
            out, lse = merge_partials(out, lse, block_out, block_lse)
            if pending is not None:
                received, works = pending
                for work in works:
                    work.wait()
                block = received
        ctx.save_for_backward(qf, kf, vf, out, lse, q_index, q_docs, docs_all)
        ctx.ring, ctx.seq_len, ctx.dtype, ctx.scale = ring, seq_len, q.dtype, scale
        return out.transpose(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        qf, kf, vf, out, lse, q_index, q_docs, docs_all = ctx.saved_tensors
        ring, scale = ctx.ring, ctx.scale
        n_heads, kv_heads = qf.shape[1], kf.shape[1]
        grad_out = grad_out.transpose(1, 2).to(qf.dtype)
        delta = (grad_out * out).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
        grad_q = torch.zeros_like(qf)
        block = torch.stack([kf, vf])
        grad_block = torch.zeros_like(block)  # dK, dV of the block held, travelling with it
        for step in range(ring.size):
            pending = ring.start(block) if step < ring.size - 1 else None
            source = ring.source(step)
            k_index = context_parallel_index(source, ring.size, ctx.seq_len, qf.device)
            allowed = _allowed(q_index, k_index, q_docs, None if docs_all is None else docs_all[:, k_index])
            k_rep, v_rep = repeat_kv_heads(block[0], n_heads), repeat_kv_heads(block[1], n_heads)
            probs = torch.exp(_block_scores(qf, k_rep, allowed, scale) - lse[..., None])
            grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
            grad_scores = probs * (torch.matmul(grad_out, v_rep.transpose(-1, -2)) - delta)
            grad_q += torch.matmul(grad_scores, k_rep) * scale
            grad_k = torch.matmul(grad_scores.transpose(-1, -2), qf) * scale
            grad_block[0] += sum_kv_groups(grad_k, kv_heads)
            grad_block[1] += sum_kv_groups(grad_v, kv_heads)
            grad_block = ring.shift(grad_block)  # after the last step it is this rank's own again
            if pending is not None:
                received, works = pending
                for work in works:
                    work.wait()
                block = received
        to_model = lambda t: t.transpose(1, 2).to(ctx.dtype)  # noqa: E731
        return to_model(grad_q), to_model(grad_block[0]), to_model(grad_block[1]), None, None, None, None, None


def repeat_kv_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[b, kv_heads, n, d] -> [b, n_heads, n, d] (grouped-query attention)."""
    return repeat_kv(x.transpose(1, 2), n_heads).transpose(1, 2)


def sum_kv_groups(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The adjoint of repeat_kv_heads: [b, n_heads, n, d] summed over each kv head's query group."""
    b, n_heads, n, d = grad.shape
    return grad.view(b, kv_heads, n_heads // kv_heads, n, d).sum(dim=2)


class RingAttention:
    """attention_fn under cp > 1: K and V passed around the cp ranks, partial results merged by
    their log-sum-exp (see the module docstring)."""

    communicates = True  # peer-to-peer inside: train.compile leaves it eager

    def __init__(self, group: Group):
        self.group = group
        self.ring = _Ring(group)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                 document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_no_dropout(dropout_p)
        seq_len = q.shape[1] * self.ring.size
        q_index = context_parallel_index(self.ring.index, self.ring.size, seq_len, q.device)
        docs_all = None if document_ids is None else gather_ids(document_ids, self.group)
        return _RingAttentionFunction.apply(q, k, v, q_index, document_ids, docs_all, self.ring, seq_len)


def plan_context_parallel(model, group: Group, impl: str = "all_gather") -> None:
    """Make ``model`` (a megacpm.model.MiniCPM, after the TP plans) context parallel over
    ``group``: every Attention's core becomes the cp core of ``impl`` (CP_ATTENTION), and the model
    sizes its RoPE tables by the global sequence length."""
    cp = group_size(group)
    if cp == 1:
        return
    if impl not in CP_ATTENTION:
        raise ValueError(f"parallel.cp_attention: expected one of {', '.join(CP_ATTENTION)}, got {impl!r}")
    model.context_shards = cp
    for module in model.modules():
        if isinstance(module, Attention):
            if impl == "ring":
                module.attention_fn = RingAttention(group)
            else:
                module.attention_fn = AllGatherAttention(group, model.cfg.attention_impl)
