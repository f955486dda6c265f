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
  holds more than two blocks of K and V. A block is computed by PyTorch's fused attention with its
  log-sum-exp (the CPU kernel, the CUDA flash kernel in bf16 / fp16) on the chunk pairs that see
  each other, or, under a document mask, by one masked computation in fp32.

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
RING_BLOCK_KERNELS = ("auto", "fused", "masked")


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
        if self.size == 1:  # a ring of one (the kernels checked on one device): the block stays
            return send
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


# -- the ring's block kernels ----------------------------------------------------------------------
# Under the head-tail split a rank's queries are two chunks (global chunks a0 < a1) and every block
# of keys two chunks (b0 < b1); chunk a sees chunk b whole when a > b, causally when a == b and not at
# all when a < b. So without a document mask a block is at most four fused-attention calls on
# chunk pairs, each plain or causal (top-left aligned: the chunks are the same positions), whose
# results merge by their log-sum-exp; the backward of each pair is the fused backward given the
# merged output and log-sum-exp (the exact gradient of its share). With a document mask the block
# is one masked PyTorch computation (below).
def _fused_available(q: torch.Tensor) -> bool:
    """Whether PyTorch's fused attention with its log-sum-exp runs for ``q``'s device and dtype:
    the CPU kernel (any float), the CUDA flash kernel (fp16 / bf16)."""
    if q.device.type == "cpu":
        return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)


def _fused_forward(q, k, v, causal: bool, scale: float):
    """(out [b, h, n, d] in q's dtype, fp32-or-wider lse [b, h, n], what the backward needs)."""
    if q.device.type == "cuda":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse, None


def _fused_backward(grad_out, q, k, v, out, lse, causal: bool, scale: float, saved):
    """(dq, dk, dv) of one chunk pair given the merged out and lse of the queries."""
    if q.device.type == "cuda":
        cum_q, cum_k, max_q, max_k, seed, offset = saved
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, causal, scale=scale)


def chunk_pairs(q_rank: int, k_rank: int, cp: int) -> List[Tuple[int, int, bool]]:
    """(query slot, key slot, causal) of the chunk pairs that attend when cp rank ``q_rank``'s
    queries meet cp rank ``k_rank``'s keys (slots 0 and 1: each rank's two chunks in its order)."""
    pairs = []
    for i, a in enumerate(head_tail_chunks(q_rank, cp)):
        for j, b in enumerate(head_tail_chunks(k_rank, cp)):
            if a >= b:
                pairs.append((i, j, a == b))
    return pairs


class _RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_index, q_docs, docs_all, ring: _Ring, seq_len: int, fused: bool):
        # [b, n, h, d] -> [b, h, n, d]. The masked kernel computes in at least fp32; the fused one
        # in the inputs' dtype (merging in fp32). K and V travel at their kv heads and are expanded
        # per block.
        n_heads = q.shape[2]
        compute = q.dtype if fused else torch.promote_types(q.dtype, torch.float32)
        merge = torch.promote_types(q.dtype, torch.float32)
        qf, kf, vf = (t.transpose(1, 2).to(compute) for t in (q, k, v))
        scale = 1.0 / math.sqrt(q.shape[-1])
        chunk = qf.shape[2] // 2
        out = torch.zeros(qf.shape, device=q.device, dtype=merge)
        lse = torch.full(qf.shape[:-1], float("-inf"), device=q.device, dtype=merge)
        block = torch.stack([kf, vf])
        saved, lse_dtype = {}, merge
        for step in range(ring.size):
            pending = ring.start(block) if step < ring.size - 1 else None
            source = ring.source(step)
            k_rep, v_rep = repeat_kv_heads(block[0], n_heads), repeat_kv_heads(block[1], n_heads)
            if fused:
                for i, j, causal in chunk_pairs(ring.index, source, ring.size):
                    qs, ks = slice(i * chunk, (i + 1) * chunk), slice(j * chunk, (j + 1) * chunk)
                    block_out, block_lse, saved[(step, i, j)] = _fused_forward(
                        qf[:, :, qs], k_rep[:, :, ks], v_rep[:, :, ks], causal, scale)
                    lse_dtype = block_lse.dtype  # the kernel's, handed back to its backward
                    out[:, :, qs], lse[:, :, qs] = merge_partials(out[:, :, qs], lse[:, :, qs],
                                                                  block_out.to(merge), block_lse.to(merge))
            else:
                k_index = context_parallel_index(source, ring.size, seq_len, q.device)
                allowed = _allowed(q_index, k_index, q_docs, None if docs_all is None else docs_all[:, k_index])
                block_out, block_lse = _block_forward(qf, k_rep, v_rep, allowed, scale)
                out, lse = merge_partials(out, lse, block_out, block_lse)
            if pending is not None:
                received, works = pending
                for work in works:
                    work.wait()
                block = received
        ctx.save_for_backward(qf, kf, vf, out, lse, q_index, q_docs, docs_all)
        ctx.ring, ctx.seq_len, ctx.dtype, ctx.scale = ring, seq_len, q.dtype, scale
        ctx.fused, ctx.saved, ctx.lse_dtype = fused, saved, lse_dtype
        return out.transpose(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        qf, kf, vf, out, lse, q_index, q_docs, docs_all = ctx.saved_tensors
        ring, scale = ctx.ring, ctx.scale
        n_heads, kv_heads = qf.shape[1], kf.shape[1]
        accumulate = torch.promote_types(qf.dtype, torch.float32)
        grad_out = grad_out.transpose(1, 2).to(qf.dtype)
        if ctx.fused:
            out_c, lse_c = out.to(qf.dtype), lse.to(ctx.lse_dtype)
        else:
            delta = (grad_out * out).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
        chunk = qf.shape[2] // 2
        grad_q = torch.zeros(qf.shape, device=qf.device, dtype=accumulate)
        block = torch.stack([kf, vf])
        grad_block = torch.zeros(block.shape, device=qf.device, dtype=accumulate)  # dK, dV of the block held
        for step in range(ring.size):
            pending = ring.start(block) if step < ring.size - 1 else None
            source = ring.source(step)
            k_rep, v_rep = repeat_kv_heads(block[0], n_heads), repeat_kv_heads(block[1], n_heads)
            if ctx.fused:
                grad_k = torch.zeros(k_rep.shape, device=qf.device, dtype=accumulate)
                grad_v = torch.zeros_like(grad_k)
                for i, j, causal in chunk_pairs(ring.index, source, ring.size):
                    qs, ks = slice(i * chunk, (i + 1) * chunk), slice(j * chunk, (j + 1) * chunk)
                    dq, dk, dv = _fused_backward(grad_out[:, :, qs], qf[:, :, qs], k_rep[:, :, ks], v_rep[:, :, ks],
                                                 out_c[:, :, qs], lse_c[:, :, qs], causal, scale,
                                                 ctx.saved[(step, i, j)])
                    grad_q[:, :, qs] += dq
                    grad_k[:, :, ks] += dk
                    grad_v[:, :, ks] += dv
            else:
                k_index = context_parallel_index(source, ring.size, ctx.seq_len, qf.device)
                allowed = _allowed(q_index, k_index, q_docs, None if docs_all is None else docs_all[:, k_index])
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
        return (to_model(grad_q), to_model(grad_block[0]), to_model(grad_block[1]),
                None, None, None, None, None, None)


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

    def __init__(self, group: Group, block_kernel: str = "auto"):
        if block_kernel not in RING_BLOCK_KERNELS:
            raise ValueError(f"ring block kernel: expected one of {', '.join(RING_BLOCK_KERNELS)}, got {block_kernel!r}")
        self.group, self.block_kernel = group, block_kernel
        self.ring = _Ring(group)

    def uses_fused(self, q: torch.Tensor, document_ids: Optional[torch.Tensor]) -> bool:
        """The fused chunk-pair kernel ("auto": without a document mask, where PyTorch has one for
        q's device and dtype); the masked PyTorch kernel otherwise."""
        if self.block_kernel == "masked" or document_ids is not None:
            return False
        available = _fused_available(q)
        if self.block_kernel == "fused" and not available:
            raise ValueError(f"ring block kernel fused: no fused attention for {q.dtype} on {q.device.type}")
        return available

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                 document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_no_dropout(dropout_p)
        seq_len = q.shape[1] * self.ring.size
        q_index = context_parallel_index(self.ring.index, self.ring.size, seq_len, q.device)
        docs_all = None if document_ids is None else gather_ids(document_ids, self.group)
        return _RingAttentionFunction.apply(q, k, v, q_index, document_ids, docs_all, self.ring, seq_len,
                                            self.uses_fused(q, document_ids))


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
