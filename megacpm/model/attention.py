"""Causal self-attention kernels, selected by ``ModelConfig.attention_impl``.

All take q [batch, seq, n_heads, head_dim] and k, v [batch, seq, n_kv_heads, head_dim] (grouped-query
attention when n_kv_heads < n_heads) and return [batch, seq, n_heads, head_dim], scaled by
1 / sqrt(head_dim), with dropout ``dropout_p`` on the attention probabilities (drawn from the default
generator: see megacpm.parallel.random for tensor-parallel regions).

- "flash": flash-attn's ``flash_attn_func`` (CUDA, fp16/bf16 only; imported lazily).
- "sdpa": ``torch.nn.functional.scaled_dot_product_attention`` (any device).
- "auto": flash-attn when the inputs allow it and it is installed, else sdpa.
- "eager": plain matmul + fp32 softmax; the readable reference path.

``document_ids`` [batch, seq] (None: one causal sequence per row) is the document mask of packed
samples: a token attends to the earlier tokens of its own document only. Each document must be one
contiguous run of its row (how packing and data.document_mask lay them out). sdpa and eager take it
as a block-diagonal causal boolean mask; flash as flash-attn's variable-length path, whose
cu_seqlens are the documents' boundaries over the flattened batch.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def flash_attn_function() -> Optional[Callable]:
    """flash-attn's ``flash_attn_func``, or None when it is not installed (import attempted once)."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # ImportError, or a build that fails to load against this torch / CUDA
        return None
    return flash_attn_func


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Expand [b, s, n_kv_heads, d] to [b, s, n_heads, d]: each kv head serves n_heads / n_kv_heads q heads."""
    groups = n_heads // x.shape[2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq] bool, True where query i may attend key j: j <= i in i's document."""
    seq_len = document_ids.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_document & causal)[:, None]


def document_boundaries(document_ids: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [documents + 1], the longest document) over the flattened batch: a new
    document starts wherever the id changes and at every row's first token."""
    batch, seq_len = document_ids.shape
    flat = document_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::seq_len] = True
    first = starts.nonzero().flatten()
    total = torch.tensor([batch * seq_len], device=flat.device)
    cu_seqlens = torch.cat([first, total]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     impl: str = "sdpa", dropout_p: float = 0.0) -> torch.Tensor:
    """Attention under an explicit mask: ``allowed`` (bool, broadcastable to [batch, 1, q_len,
    k_len]) is True where query i may attend key j. ``impl`` "eager" (matmul + fp32 softmax) or
    "sdpa"; the query and key lengths may differ."""
    if impl == "eager":
        n_heads = q.shape[2]
        k, v = repeat_kv(k, n_heads), repeat_kv(v, n_heads)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        return torch.matmul(probs, v).transpose(1, 2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    seq_len = q.shape[1]
    if document_ids is None:
        allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    else:
        allowed = document_causal_mask(document_ids)
    return masked_attention(q, k, v, allowed, "eager", dropout_p)


def attention_at_end(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto", dropout_p: float = 0.0,
                     q_document_ids: Optional[torch.Tensor] = None,
                     k_document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of queries that are the last ``q_len`` positions of the keys' range (the
    bottom-right-aligned causal mask: query i sees keys j <= k_len - q_len + i), e.g. a context-
    parallel chunk against the global prefix ending with it. SDPA's ``is_causal`` is top-left
    aligned when the lengths differ, hence the explicit mask; flash-attn's ``causal`` is bottom-right
    aligned (flash-attn >= 2.1) and is used when "auto"/"flash" may and there is no document mask.
    ``q_document_ids`` [batch, q_len] and ``k_document_ids`` [batch, k_len]: a document mask."""
    q_len, k_len = q.shape[1], k.shape[1]
    if q_document_ids is None and impl in ("auto", "flash") and q.is_cuda and q.dtype in HALF_DTYPES:
        flash_attn_func = flash_attn_function()
        if flash_attn_func is not None:
            return flash_attn_func(q, k.to(q.dtype), v.to(q.dtype), dropout_p=dropout_p,
                                   softmax_scale=1.0 / math.sqrt(q.shape[-1]), causal=True)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    if q_document_ids is not None:
        same_document = q_document_ids[:, :, None] == k_document_ids[:, None, :]
        allowed = (allowed & same_document)[:, None]
    return masked_attention(q, k, v, allowed, "eager" if impl == "eager" else "sdpa", dropout_p)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                   document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    grouped = k.shape[1] != q.shape[1]
    if document_ids is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=grouped)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(document_ids),
                                             dropout_p=dropout_p, enable_gqa=grouped)
    return out.transpose(1, 2)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    flash_attn_func = flash_attn_function()
    if flash_attn_func is None:
        raise RuntimeError("model.attention_impl is 'flash' but flash-attn is not installed "
                           "(pip install flash-attn), or use attention_impl 'auto' or 'sdpa'")
    if not q.is_cuda or q.dtype not in HALF_DTYPES:
        raise RuntimeError("model.attention_impl 'flash' needs CUDA tensors in fp16/bf16 "
                           f"(got {q.device.type}, {q.dtype}); use 'auto' or 'sdpa' here")
    # flash-attn handles grouped kv heads itself and wants all three inputs in one half dtype.
    k, v = k.to(q.dtype), v.to(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if document_ids is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=True)
    from flash_attn import flash_attn_varlen_func  # present whenever flash_attn_func is

    batch, seq_len = q.shape[:2]
    cu_seqlens, longest = document_boundaries(document_ids)
    out = flash_attn_varlen_func(q.reshape(batch * seq_len, *q.shape[2:]), k.reshape(batch * seq_len, *k.shape[2:]),
                                 v.reshape(batch * seq_len, *v.shape[2:]), cu_seqlens, cu_seqlens, longest, longest,
                                 dropout_p=dropout_p, softmax_scale=scale, causal=True)
    return out.view(q.shape)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto",
                     dropout_p: float = 0.0, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    if impl == "eager":
        return eager_attention(q, k, v, dropout_p, document_ids)
    if impl == "flash":
        return flash_attention(q, k, v, dropout_p, document_ids)
    if impl == "auto":
        if q.is_cuda and q.dtype in HALF_DTYPES and flash_attn_function() is not None:
            return flash_attention(q, k, v, dropout_p, document_ids)
        return sdpa_attention(q, k, v, dropout_p, document_ids)
    if impl == "sdpa":
        return sdpa_attention(q, k, v, dropout_p, document_ids)
    raise ValueError(f"unknown attention_impl {impl!r} (expected auto, sdpa, flash or eager)")
