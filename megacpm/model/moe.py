"""The mixture-of-experts MLP of MiniCPM-MoE: a router, top-k dispatch, stacked SwiGLU experts.

Routing as the released model does it: router logits ``gate(x)`` [tokens, E], a softmax over all E
experts in fp32, the top k, their weights renormalised to sum to 1, and the weighted sum of the k
experts' SwiGLU outputs. With ``router_bias`` (DeepSeek-V3's auxiliary-loss-free balancing) the
bias shifts which experts are chosen, never the weights they get.

Dropless by default: every token reaches its k experts. With a capacity factor c, expert e takes at
most ceil(c * tokens * k / E) assignments, in token order (Megatron's capacity semantics); the
others are dropped (they add nothing; the token keeps its other experts' outputs) and counted.

The experts are stored stacked, one tensor per kind (``w1`` gate [E, I, H], ``w3`` up [E, I, H],
``w2`` down [E, H, I]: Hugging Face MiniCPM-MoE's names), so checkpoints and a grouped GEMM see one
tensor each. The expert computation runs over the assignments sorted by expert (``grouped_swiglu``).

The load-balancing loss (Switch Transformer's) of one layer is E * sum_i importance_i * load_i,
importance the mean router probability of expert i and load the fraction of assignments it got (1
at perfect balance). It reaches the router through ``attach_aux_loss``: an identity on the layer's
output whose backward also back-propagates the loss, so no loss value travels with the activations
(through the pipeline, for instance).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megacpm import kernels


@dataclass
class Routing:
    weights: torch.Tensor  # fp32 [tokens, k], each row summing to 1 (before any capacity drop)
    experts: torch.Tensor  # int64 [tokens, k]
    probs: torch.Tensor  # fp32 [tokens, E], the softmax over all experts (the aux loss's importance)
    logits: torch.Tensor  # fp32 [tokens, E] (the z-loss's)


def route(logits: torch.Tensor, k: int, router_bias: Optional[torch.Tensor] = None) -> Routing:
    """Top-k routing of router logits [tokens, E] (see the module docstring)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    scores = probs if router_bias is None else probs + router_bias.float()
    experts = torch.topk(scores, k, dim=-1).indices
    chosen = probs.gather(-1, experts)
    return Routing(weights=chosen / chosen.sum(-1, keepdim=True), experts=experts, probs=probs, logits=logits)


def expert_load(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """fp32 [E]: the fraction of all assignments that went to each expert (sums to 1)."""
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).float()
    return counts / max(experts.numel(), 1)


def load_balancing_loss(routing: Routing, num_experts: int, load: Optional[torch.Tensor] = None) -> torch.Tensor:
    """E * sum_i importance_i * load_i (differentiable through importance only, as in Switch);
    ``load`` [E] when the assignments are counted over more tokens than ``routing``'s (a sequence
    split over context-parallel ranks), expert_load of the routing otherwise."""
    importance = routing.probs.mean(dim=0)
    if load is None:
        load = expert_load(routing.experts, num_experts)
    return num_experts * (importance * load).sum()


def z_loss(routing: Routing) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean squared log-sum-exp of the logits."""
    return torch.logsumexp(routing.logits, dim=-1).square().mean()


def capacity_keep(experts: torch.Tensor, num_experts: int, capacity_factor: Optional[float]) -> torch.Tensor:
    """bool [tokens, k]: the assignments an expert takes (all, dropless); the first ``capacity`` of
    each expert in token order otherwise."""
    if capacity_factor is None:
        return torch.ones_like(experts, dtype=torch.bool)
    capacity = math.ceil(capacity_factor * experts.numel() / num_experts)
    flat = experts.reshape(-1)  # token-major: token t's assignments come before token t + 1's
    one_hot = F.one_hot(flat, num_experts)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # rank of each assignment within its expert
    return (position < capacity).view_as(experts)


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                   w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each expert over its rows: ``x`` [assignments, H] sorted by expert, ``counts`` [E]
    rows per expert (zeros allowed), ``w1``/``w3`` [E, I, H], ``w2`` [E, H, I]; returns [assignments, H].
    Three grouped GEMMs (megacpm.kernels.grouped_matmul, impl "auto": one Triton launch each on CUDA
    or under TRITON_INTERPRET=1, a loop of one matmul per expert with rows otherwise)."""
    gate = kernels.grouped_matmul(x, w1, counts)
    up = kernels.grouped_matmul(x, w3, counts)
    return kernels.grouped_matmul(F.silu(gate) * up, w2, counts)


def draw_router(num_experts: int, hidden_size: int, std: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A new router's weight [E, hidden] ~ N(0, std^2) (sparse upcycling's), drawn in fp32 on the CPU."""
    return torch.randn(num_experts, hidden_size, generator=generator) * std


class _AttachAuxLoss(torch.autograd.Function):
    """out = output; backward: output's gradient as is, and ``scale`` as the aux loss's."""

    @staticmethod
    def forward(ctx, output, aux_loss, scale):
        ctx.scale = scale
        ctx.save_for_backward(aux_loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


def attach_aux_loss(output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
    """``output`` unchanged; back-propagating through it also back-propagates scale * aux_loss."""
    return _AttachAuxLoss.apply(output, aux_loss, float(scale))


def _whole(output: torch.Tensor) -> torch.Tensor:
    return output


class MoEMLP(nn.Module):
    """E SwiGLU experts of (hidden, intermediate) behind a top-k router.

    Injected when the model is sharded: ``complete_output`` (megacpm.parallel.plans.plan_moe), what
    turns the combined expert outputs into the layer's output (the sum of the TP ranks' partial
    outputs when the experts' intermediate dimension is split; the identity in one process), and
    ``run_experts`` (megacpm.parallel.experts: the assignments sent to the EP ranks holding their
    experts and back; grouped_swiglu over local experts in one process).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, num_experts_per_tok: int,
                 capacity_factor: Optional[float] = None):
        super().__init__()
        if not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(f"model.num_experts_per_tok {num_experts_per_tok} must be in 1..model.num_experts "
                             f"{num_experts}")
        self.num_experts, self.k, self.capacity_factor = num_experts, num_experts_per_tok, capacity_factor
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.w3 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.register_buffer("router_bias", torch.zeros(num_experts), persistent=False)
        self.complete_output = _whole
        self.run_experts = grouped_swiglu

    @torch.no_grad()
    def upcycle_from(self, dense_gate: torch.Tensor, dense_up: torch.Tensor, dense_down: torch.Tensor,
                     router_std: float, generator: Optional[torch.Generator] = None) -> None:
        """Every expert an exact copy of a dense SwiGLU (gate_proj, up_proj, down_proj weights), the
        router drawn from N(0, router_std^2) (sparse upcycling)."""
        self.w1.copy_(dense_gate.expand_as(self.w1))
        self.w3.copy_(dense_up.expand_as(self.w3))
        self.w2.copy_(dense_down.expand_as(self.w2))
        self.gate.weight.copy_(draw_router(self.num_experts, self.gate.weight.shape[1], router_std, generator))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Routing, torch.Tensor]:
        """(output shaped like x, the routing, bool keep [tokens, k]) for x [..., hidden]."""
        tokens = x.reshape(-1, x.shape[-1])
        routing = route(self.gate(tokens), self.k, self.router_bias if self.router_bias.any() else None)
        keep = capacity_keep(routing.experts, self.num_experts, self.capacity_factor)
        flat_experts = routing.experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)  # assignments grouped by expert
        token_of = order // self.k
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        expert_out = self.run_experts(tokens[token_of], counts, self.w1, self.w3, self.w2)
        weight = (routing.weights * keep).reshape(-1)[order].to(expert_out.dtype)
        combined = torch.zeros_like(tokens).index_add_(0, token_of, expert_out * weight[:, None])
        return self.complete_output(combined.view_as(x)), routing, keep
