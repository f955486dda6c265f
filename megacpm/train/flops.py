"""Model FLOPs per token, PaLM convention (Chowdhery et al. 2022, appendix B).

training = 6 * N_matmul + 12 * L * n_heads * head_dim * seq_len, forward = training / 3, where
N_matmul counts every weight used in a matrix multiply: the attention q, k, v, o and MLP
gate, up, down projections of every layer plus the LM head (counted even when it is tied to the
embedding, since the logits are a matmul either way); the embedding lookup is not a matmul and
RMSNorm gains are not counted. The attention term counts the full (non-causal) seq_len x seq_len
score and value products, 2 matmuls x 2 FLOPs x 3 (forward + backward) per token, as PaLM does;
no activation recomputation is included (this is model FLOPs, the basis of MFU). An MoE layer
counts what a token runs: its router (hidden x E) and k experts' SwiGLU weights, the active
parameters.
"""
from __future__ import annotations

from typing import Dict

from megacpm.config import ModelConfig


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix multiply per token, including the LM head (of an MoE
    layer: the router and the k experts a token is routed to)."""
    d, head_dim = cfg.hidden_size, cfg.head_dim
    attention = d * head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)  # q, o, k, v
    mlp = 3 * d * cfg.intermediate_size
    if cfg.is_moe:
        mlp = cfg.num_experts_per_tok * mlp + d * cfg.num_experts
    return cfg.num_hidden_layers * (attention + mlp) + cfg.vocab_size * d


def flops_per_token(cfg: ModelConfig, seq_len: int) -> Dict[str, float]:
    """{"forward": ..., "training": ...} FLOPs per token for sequences of ``seq_len`` tokens."""
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    training = 6 * matmul_parameters(cfg) + attention
    return {"forward": training / 3, "training": float(training)}
