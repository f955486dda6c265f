"""Estimate of the memory one training step needs on one rank.

Counted: fp32 master weights, fp32 gradients, AdamW's two fp32 moments (16 bytes per parameter),
the activations kept for the backward of one micro-batch, and the chunked loss's logits. Not
counted: allocator fragmentation, the CUDA context, communication buffers. It is an estimate to
choose a layout with, not a promise.
"""
from __future__ import annotations

from typing import Dict

from megacpm.config import Config
from megacpm.model.minicpm import DEFAULT_LOSS_CHUNK_TOKENS

BYTES_PER_PARAM_STATE = {"weights": 4, "grads": 4, "optimizer": 8}


def activation_bytes_per_token_per_layer(cfg: Config, act_bytes: int) -> int:
    """Tensors a decoder layer saves for its backward, per token (flash/sdpa attention: no s^2 term).

    attention half: norm input and output, q, k, v, attention output (+ fp32 log-sum-exp), o_proj
    input; MLP half: norm input and output, gate, up, silu(gate), their product.
    """
    m = cfg.model
    kv_width = m.num_key_value_heads * m.head_dim
    attention = (5 * m.hidden_size + 2 * kv_width) * act_bytes + 4 * m.num_attention_heads
    mlp = (2 * m.hidden_size + 4 * m.intermediate_size) * act_bytes
    return attention + mlp


def estimate_training_memory(cfg: Config, num_params: int, device_type: str = "cuda") -> Dict[str, int]:
    """Bytes per rank for the configured layout (single process until parallel layouts land)."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    shards = p.tp * p.pp
    params_per_rank = num_params // shards
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device_type == "cuda")
    act_bytes = 2 if bf16 else 4
    tokens = t.micro_batch_size * t.seq_len
    layers_per_rank = m.num_hidden_layers // p.pp
    per_layer = activation_bytes_per_token_per_layer(cfg, act_bytes) * tokens
    if t.activation_checkpointing:
        # Only each layer's input is kept; one layer's activations are rebuilt at a time.
        activations = layers_per_rank * tokens * m.hidden_size * act_bytes + per_layer
    else:
        activations = layers_per_rank * per_layer
    # The chunked loss holds one chunk's fp32 logits and their gradient.
    loss_chunk = 2 * min(tokens, DEFAULT_LOSS_CHUNK_TOKENS) * m.vocab_size * 4
    estimate = {
        "weights": params_per_rank * BYTES_PER_PARAM_STATE["weights"],
        "grads": params_per_rank * BYTES_PER_PARAM_STATE["grads"],
        "optimizer": params_per_rank * BYTES_PER_PARAM_STATE["optimizer"],
        "activations": activations,
        "loss_chunk": loss_chunk,
    }
    estimate["total"] = sum(estimate.values())
    return estimate
