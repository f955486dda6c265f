"""Estimate of the memory one training step needs on one rank.

Counted: the weights (bf16 or fp32), the fp32 gradient buffer, the optimizer's fp32 master weights
and two moments (12 bytes per parameter, divided by dp under ZeRO-1), the activations kept for the
backward of the schedule's in-flight micro-batches, and the loss head: the workspace of the path
the model trains through (megacpm.kernels.fused_linear_cross_entropy_workspace_bytes: one chunk of
logits, the fp32 weight-gradient accumulator, the hidden gradient), whatever the tensor-parallel
size. MoE experts are split over ep. Context parallelism splits every sequence over cp ranks: a
rank keeps the activations of seq_len / cp tokens, plus, with the all-gather core, the gathered K and
V of the other ranks' tokens; ZeRO-1 shards over dp x cp.
DPO counts a pair's two rows per sample, and ``objective.reference: live`` its frozen copy of
the weights. Not counted: allocator fragmentation, the CUDA context, communication buffers. It is an
estimate to choose a layout with, not a promise.
"""
from __future__ import annotations

from typing import Dict

import torch

from megacpm.config import Config
from megacpm.kernels import fused_linear_cross_entropy_workspace_bytes
from megacpm.objectives import OBJECTIVES
from megacpm.parallel.layout import ParallelLayout

GRAD_BYTES = 4  # the fp32 gradient buffer
OPTIMIZER_BYTES = 12  # fp32 master weights + AdamW's two fp32 moments


def activation_bytes_per_token_per_layer(cfg: Config, act_bytes: int) -> float:
    """Tensors a decoder layer saves for its backward, per token, on one TP rank (flash/sdpa
    attention: no s^2 term).

    attention half: norm input and output, q, k, v, attention output (+ fp32 log-sum-exp), o_proj
    input; MLP half: norm input and output, gate, up, silu(gate), their product. The projections'
    outputs are split over TP; the norms' tensors are split too under sequence parallelism. An MoE
    layer keeps those four per routed copy of the token (k of them), plus each copy's dispatched
    input and expert output and the fp32 router logits and probabilities. Under context
    parallelism with the all-gather core, a token's rank also keeps the K and V of cp - 1 tokens of
    the other ranks (the gathered sequence); the ring keeps only its own.
    """
    m, tp, cp = cfg.model, cfg.parallel.tp, cfg.parallel.cp
    kv_width = m.num_key_value_heads * m.head_dim
    replicated = 4 * m.hidden_size * act_bytes  # two norms' inputs and outputs
    copies = m.num_experts_per_tok if m.is_moe else 1
    split = ((3 * m.hidden_size + 2 * kv_width + 4 * copies * m.intermediate_size) * act_bytes
             + 4 * m.num_attention_heads)
    if m.is_moe:
        replicated += 2 * copies * m.hidden_size * act_bytes + 2 * 4 * m.num_experts
    if cp > 1 and cfg.parallel.cp_attention == "all_gather":
        split += 2 * kv_width * act_bytes * (cp - 1)
    if cfg.parallel.sp:
        replicated /= tp
    return replicated + split / tp


def peak_in_flight_chunks(pp: int, vpp: int, micro_batches: int) -> int:
    """Most model chunks whose activations pipeline rank 0 (the worst) holds at once."""
    from megacpm.parallel.pipeline_schedule import build_schedule, check_schedule

    try:
        check_schedule(pp, micro_batches, vpp)
    except ValueError:
        return min(pp, micro_batches) * vpp  # an invalid schedule: a coarse bound for planning
    in_flight = peak = 0
    for action in build_schedule(pp, 0, micro_batches, vpp):
        in_flight += 1 if action.kind == "F" else -1
        peak = max(peak, in_flight)
    return peak


def rows_per_micro_batch(cfg: Config) -> int:
    """Sequences in one micro-batch: train.micro_batch_size samples of the objective's rows each."""
    return cfg.train.micro_batch_size * OBJECTIVES[cfg.objective.kind].rows_per_sample


def tokens_per_micro_batch(cfg: Config) -> int:
    """Tokens of one micro-batch on one rank: its rows' share of each sequence (seq_len / cp)."""
    return rows_per_micro_batch(cfg) * cfg.train.seq_len // cfg.parallel.cp


def loss_head_bytes(cfg: Config, device_type: str) -> int:
    """The LM head's workspace on one rank for one micro-batch: its share of the vocabulary
    (ceil(vocab / tp) rows, padding included) over the rank's micro_batch_size * seq_len / cp
    tokens (sequence parallelism gathers them before the head), in the dtype the run trains in."""
    m, t, tp = cfg.model, cfg.train, cfg.parallel.tp
    dtype = torch.bfloat16 if t.uses_bf16(device_type) else torch.float32
    local_vocab = -(-m.vocab_size // tp)
    return fused_linear_cross_entropy_workspace_bytes(
        tokens_per_micro_batch(cfg), m.hidden_size, local_vocab, compute_dtype=dtype, hidden_dtype=dtype,
        weight_dtype=dtype, triton_path=device_type == "cuda")


def estimate_training_memory(cfg: Config, num_params: int, device_type: str = "cuda",
                             world_size: int = 1, expert_params: int = 0) -> Dict[str, int]:
    """Bytes per rank for the configured layout (tp, pp, vpp, dp, sp, zero1, ep). ``expert_params``
    of the ``num_params`` are MoE experts: split over ep as well, their ZeRO-1 state over the
    expert-data-parallel ranks (dp / ep)."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    dp = max(1, ParallelLayout.from_config(p, world_size).dp)
    dense_per_rank = (num_params - expert_params) // (p.tp * p.pp)
    experts_per_rank = expert_params // (p.tp * p.pp * p.ep)
    params_per_rank = dense_per_rank + experts_per_rank
    act_bytes = 2 if t.uses_bf16(device_type) else 4
    tokens = tokens_per_micro_batch(cfg)
    micro_batches = max(1, t.global_batch_size // (t.micro_batch_size * dp))
    layers_per_chunk = m.num_hidden_layers // (p.pp * p.vpp)
    per_layer = activation_bytes_per_token_per_layer(cfg, act_bytes) * tokens
    chunks = peak_in_flight_chunks(p.pp, p.vpp, micro_batches) if p.pp > 1 else 1
    if t.activation_checkpointing:
        # Only each layer's input is kept; one layer's activations are rebuilt at a time.
        layer_input = tokens * m.hidden_size * act_bytes / (p.tp if p.sp else 1)
        activations = chunks * layers_per_chunk * layer_input + per_layer
    else:
        activations = chunks * layers_per_chunk * per_layer
    estimate = {
        "weights": params_per_rank * act_bytes,
        "grads": params_per_rank * GRAD_BYTES,
        # ZeRO-1 shards over the ranks a gradient is reduced over: dp x cp (experts: dp / ep x cp).
        "optimizer": int(dense_per_rank * OPTIMIZER_BYTES / (dp * p.cp if p.zero1 else 1)
                         + experts_per_rank * OPTIMIZER_BYTES / (max(1, dp // p.ep) * p.cp if p.zero1 else 1)),
        "activations": int(activations),
        "loss_head": loss_head_bytes(cfg, device_type),
    }
    if cfg.objective.kind == "dpo" and cfg.objective.reference == "live":
        estimate["reference"] = params_per_rank * act_bytes
    estimate["total"] = sum(estimate.values())
    return estimate
