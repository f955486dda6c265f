"""The MiniCPM decoder (arXiv 2404.06395) with its muP forward multipliers.

h = embed(ids) * scale_emb; per block: h += r * attn(rms_norm(h)); h += r * mlp(rms_norm(h)) with
r = scale_depth / sqrt(L); logits = (rms_norm(h) / m) @ W_out^T with m = hidden_size / dim_model_base.
Parameter names are Hugging Face MiniCPM's without the "model." prefix, so checkpoints convert by
renaming only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megacpm import kernels
from megacpm.config import ModelConfig
from megacpm.model.attention import causal_attention
from megacpm.model.mup import init_weights
from megacpm.model.rotary import RotaryEmbedding, apply_rotary

# Tokens whose [tokens, vocab] fp32 logits are alive at once in ``MiniCPM.loss``: 4096 tokens x
# 122,753 vocab x 4 bytes is 2 GB, where an unchunked micro-batch of 2 x 4096 tokens would hold
# twice that, plus its gradient, plus a bf16 copy under autocast.
DEFAULT_LOSS_CHUNK_TOKENS = 4096


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), statistics in fp32, normalised value back in x's dtype.

    The one place RMSNorm is computed: megacpm.kernels.rms_norm with impl "auto" (the Triton kernel
    on CUDA or under TRITON_INTERPRET=1, the PyTorch implementation with these semantics otherwise).
    """
    return kernels.rms_norm(x, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE on q and k."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.impl = cfg.attention_impl
        self.dropout = cfg.attention_dropout
        # Set when the heads are split over tensor-parallel ranks: dropout then draws from this
        # rank's own stream (megacpm.parallel.random).
        self.tp_rank: Optional[int] = None
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Shapes come from the projections, not from x: under tensor/sequence parallelism x may be a
        # sequence shard while q, k, v cover the whole sequence and only this rank's heads.
        q = self.q_proj(x)
        batch, seq_len = q.shape[:2]
        q = q.view(batch, seq_len, -1, self.head_dim)
        k = self.k_proj(x).view(batch, seq_len, -1, self.head_dim)
        v = self.v_proj(x).view(batch, seq_len, -1, self.head_dim)
        q, k = apply_rotary(q, k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        if dropout > 0 and self.tp_rank is not None:
            from megacpm.parallel.random import tensor_parallel_rng

            with tensor_parallel_rng(self.tp_rank, q.device):
                out = causal_attention(q, k, v, self.impl, dropout)
        else:
            out = causal_attention(q, k, v, self.impl, dropout)
        return self.o_proj(out.flatten(2))


class DecoderLayer(nn.Module):
    """Pre-norm block; each residual branch is scaled by r = scale_depth / sqrt(L) (muP)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.residual_scale = cfg.residual_scale
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.residual_scale * self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.residual_scale * self.mlp(self.post_attention_layernorm(h))


class MiniCPM(nn.Module):
    def __init__(self, cfg: ModelConfig, activation_checkpointing: bool = False,
                 loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.loss_chunk_tokens = loss_chunk_tokens
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)

    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        """muP initialisation (see megacpm.model.mup), deterministic given ``generator``."""
        init_weights(self, self.cfg, generator)

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM-head weight [vocab, hidden]: the embedding when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq, hidden] final-normed hidden state, before muP's 1/m logit scale."""
        h = self.embed_tokens(input_ids) * self.cfg.embedding_scale
        cos, sin = self.rotary(input_ids.shape[1], input_ids.device)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin)
        return self.norm(h)

    def _scaled_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        # muP divides the final hidden state by m before the LM head; doing it here rather than on
        # the logits costs hidden_size instead of vocab_size multiplies per token.
        return self.hidden_states(input_ids) / self.cfg.width_mult

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits [batch, seq, vocab] = (h / m) @ W_out^T."""
        return F.linear(self._scaled_hidden(input_ids), self.output_weight).float()

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
             chunk_tokens: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sum of token cross entropies in fp32, number of labels != ignore_index as int64).

        megacpm.kernels.fused_linear_cross_entropy with muP's 1/m as its logit scale (one fewer pass
        over the hidden states than dividing them): the logits are computed ``chunk_tokens`` tokens
        at a time (default ``self.loss_chunk_tokens``) and never saved; each chunk's gradients are
        computed in the forward (Triton on CUDA, PyTorch on the CPU).
        """
        chunk_tokens = chunk_tokens or self.loss_chunk_tokens
        hidden = self.hidden_states(input_ids).flatten(0, 1)
        labels = labels.reshape(-1)
        num_tokens = (labels != ignore_index).sum()
        loss_sum = kernels.fused_linear_cross_entropy(hidden, self.output_weight, labels,
                                              logit_scale=1.0 / self.cfg.width_mult, ignore_index=ignore_index,
                                              reduction="sum", chunk_tokens=chunk_tokens)
        return loss_sum, num_tokens
