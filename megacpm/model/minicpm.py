"""The MiniCPM decoder (arXiv 2404.06395) with its muP forward multipliers.

h = embed(ids) * scale_emb; per block: h += r * attn(rms_norm(h)); h += r * mlp(rms_norm(h)) with
r = scale_depth / sqrt(L); logits = (rms_norm(h) / m) @ W_out^T with m = hidden_size / dim_model_base.
Parameter names are Hugging Face MiniCPM's without the "model." prefix, so checkpoints convert by
renaming only.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megacpm import kernels
from megacpm.config import ModelConfig
from megacpm.model.attention import causal_attention
from megacpm.model.moe import MoEMLP
from megacpm.model.mup import init_weights
from megacpm.model.rotary import RotaryEmbedding, apply_rotary

# The loss head's [tokens, vocab] logits are computed a chunk of tokens at a time: None leaves
# the chunk size to the kernels' one rule (megacpm.kernels default_chunk_tokens: a bounded number
# of logits elements, whatever the tensor-parallel vocabulary slice).
DEFAULT_LOSS_CHUNK_TOKENS: Optional[int] = None


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


DropoutRng = Callable[[torch.device], ContextManager]


def shared_rng(device: torch.device) -> ContextManager:
    """Dropout draws from the default generator (a single process, or heads not split over ranks)."""
    return contextlib.nullcontext()


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE on q and k.

    Two things are injected when the model is built, so that the model knows nothing of how it is
    parallelised: ``attention_fn(q, k, v, dropout_p=..., document_ids=...)``, the local attention
    core (``document_ids`` [batch, seq] or None: attention stays inside each packed document; default:
    megacpm.model.attention.causal_attention with model.attention_impl), and ``dropout_rng(device)``,
    the generator context the attention dropout draws in (a tensor-parallel plan gives each rank
    its own stream for its own heads).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attention_dropout
        self.attention_fn: Callable[..., torch.Tensor] = functools.partial(causal_attention, impl=cfg.attention_impl)
        self.dropout_rng: DropoutRng = shared_rng
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Shapes come from the projections, not from x: under tensor/sequence parallelism x may be a
        # sequence shard while q, k, v cover the whole sequence and only this rank's heads.
        q = self.q_proj(x)
        batch, seq_len = q.shape[:2]
        q = q.view(batch, seq_len, -1, self.head_dim)
        k = self.k_proj(x).view(batch, seq_len, -1, self.head_dim)
        v = self.v_proj(x).view(batch, seq_len, -1, self.head_dim)
        q, k = apply_rotary(q, k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        if dropout > 0:
            with self.dropout_rng(q.device):
                out = self.attention_fn(q, k, v, dropout_p=dropout, document_ids=document_ids)
        else:
            out = self.attention_fn(q, k, v, dropout_p=0.0, document_ids=document_ids)
        return self.o_proj(out.flatten(2))


class DecoderLayer(nn.Module):
    """Pre-norm block; each residual branch is scaled by r = scale_depth / sqrt(L) (muP).

    ``recompute`` (activation checkpointing): in training, keep only the block's input and recompute
    the rest in the backward. The block decides it itself, so a compiled block (train.compile)
    traces the checkpoint too and the compiler chooses what to recompute, as TorchTitan does.

    With ``model.num_experts`` > 0 the MLP is a mixture of experts (megacpm.model.moe.MoEMLP);
    ``moe`` (a megacpm.model.moe_step.MicroBatchMoE, training only) attaches its auxiliary loss and
    records its routing under this layer's global ``index``."""

    def __init__(self, cfg: ModelConfig, recompute: bool = False, index: int = 0):
        super().__init__()
        self.residual_scale = cfg.residual_scale
        self.recompute = recompute
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe
        if self.is_moe:
            self.mlp = MoEMLP(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                              cfg.moe_capacity_factor)
        else:
            self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: Optional[torch.Tensor] = None, moe=None) -> torch.Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(self.block, h, cos, sin, document_ids, moe, use_reentrant=False)
        return self.block(h, cos, sin, document_ids, moe)

    def block(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              document_ids: Optional[torch.Tensor] = None, moe=None) -> torch.Tensor:
        h = h + self.residual_scale * self.self_attn(self.input_layernorm(h), cos, sin, document_ids)
        return h + self.residual_scale * self.feed_forward(self.post_attention_layernorm(h), moe)

    def feed_forward(self, x: torch.Tensor, moe=None) -> torch.Tensor:
        if not self.is_moe:
            return self.mlp(x)
        out, routing, keep = self.mlp(x)
        return out if moe is None else moe.attach(self.index, out, routing, keep)


class LayerStack(nn.Module):
    """Decoder layers registered under their global indices, so a chunk holding layers 8..15 names
    its parameters ``layers.8.…`` as the whole model does. Iterates in index order; ``stack[i]`` is
    global layer i."""

    def __init__(self, layers: Dict[int, DecoderLayer]):
        super().__init__()
        for index in sorted(layers):
            self.add_module(str(index), layers[index])

    def __getitem__(self, index: int) -> DecoderLayer:
        return self._modules[str(index)]

    def __iter__(self) -> Iterator[DecoderLayer]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def indices(self) -> Tuple[int, ...]:
        return tuple(int(k) for k in self._modules)


OutputLoss = Callable[..., torch.Tensor]


def fused_output_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, logit_scale: float,
                      ignore_index: int, chunk_tokens: Optional[int], reduction: str = "sum") -> torch.Tensor:
    """The token loss of the LM head, one process, "sum" (the summed loss; the gradients computed
    in the forward) or "none" (per token, for per-sequence log-probabilities): logits a chunk of
    tokens at a time, never all at once (megacpm.kernels.fused_linear_cross_entropy)."""
    return kernels.fused_linear_cross_entropy(hidden, weight, labels, logit_scale=logit_scale,
                                              ignore_index=ignore_index, reduction=reduction,
                                              chunk_tokens=chunk_tokens)


class MiniCPM(nn.Module):
    """The model, or a chunk of it: [embedding] -> a range of decoder layers -> [final norm, LM head].

    ``MiniCPM(cfg)`` is the whole model; ``model.chunk(layer_ids, first, last)`` is a chunk sharing
    the model's own modules (a pipeline stage), so one process is the one-chunk case and there is one
    forward path: ``hidden`` (the chunk's output) and, on the last chunk, ``head_loss``.

    Injected when the model is sharded (the model imports nothing from megacpm.parallel):
    ``output_loss`` (the LM head's summed loss: the fused linear cross entropy here, its
    vocab-parallel form under tensor parallelism), each Attention's ``attention_fn`` and
    ``dropout_rng``, ``sequence_shards`` (how many ranks share each sequence's hidden states
    between layers: tp under sequence parallelism) and ``context_shards`` (how many ranks share each
    sequence's tokens: cp under context parallelism; RoPE tables are sized by the global length).
    """

    def __init__(self, cfg: ModelConfig, activation_checkpointing: bool = False,
                 loss_chunk_tokens: Optional[int] = DEFAULT_LOSS_CHUNK_TOKENS):
        super().__init__()
        self.cfg = cfg
        self.loss_chunk_tokens = loss_chunk_tokens
        self.output_loss: OutputLoss = fused_output_loss
        self.sequence_shards = 1
        self.context_shards = 1
        self.is_first = self.is_last = True
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = LayerStack({i: DecoderLayer(cfg, activation_checkpointing, index=i)
                                  for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)

    def chunk(self, layer_ids: Iterable[int], first: bool, last: bool) -> "MiniCPM":
        """A chunk of this model holding its embedding (``first``), the given decoder layers and its
        final norm and LM head (``last``): the same modules, not copies."""
        part = MiniCPM.__new__(MiniCPM)
        nn.Module.__init__(part)
        for name in ("cfg", "loss_chunk_tokens", "output_loss", "sequence_shards", "context_shards"):
            setattr(part, name, getattr(self, name))
        part.is_first, part.is_last = first, last
        part.embed_tokens = self.embed_tokens if first else None
        part.layers = LayerStack({i: self.layers[i] for i in layer_ids})
        part.norm = self.norm if last else None
        part.lm_head = self.lm_head if last else None
        part.rotary = self.rotary
        return part

    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        """muP initialisation (see megacpm.model.mup), deterministic given ``generator``."""
        init_weights(self, self.cfg, generator)

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM-head weight [vocab, hidden]: the embedding when tied."""
        if self.lm_head is not None:
            return self.lm_head.weight
        if self.embed_tokens is None:
            raise RuntimeError("this chunk has no LM head (a last pipeline stage of a tied model needs one)")
        return self.embed_tokens.weight

    # -- the forward path ------------------------------------------------------------------------
    def hidden(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
               document_ids: Optional[torch.Tensor] = None, moe=None) -> torch.Tensor:
        """The chunk's output: token ids [batch, seq] in on the first chunk (hidden states from the
        previous chunk otherwise), hidden states out — final-normed on the last chunk, before muP's
        1/m logit scale.

        ``position_ids`` [batch, seq] (default 0 .. seq - 1 in every row) are the RoPE positions;
        ``document_ids`` [batch, seq] keep attention inside each document (packed samples). Both
        cover whole sequences, also where the hidden states are sequence shards. ``moe`` (training
        an MoE model): the micro-batch's megacpm.model.moe_step.MicroBatchMoE."""
        if self.is_first:
            h = self.embed_tokens(x) * self.cfg.embedding_scale
            seq_len = x.shape[1]
        else:
            h = x
            seq_len = h.shape[1] * self.sequence_shards
        # The global length: the dynamic-NTK base depends on it, and context-parallel position ids
        # index the whole sequence's table.
        cos, sin = self.rotary(seq_len * self.context_shards, h.device)
        if position_ids is not None:  # per-token tables [batch, seq, head_dim]
            cos, sin = cos[position_ids], sin[position_ids]
        for layer in self.layers:
            h = layer(h, cos, sin, document_ids, moe)
        return self.norm(h) if self.is_last else h

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  chunk_tokens: Optional[int] = None, reduction: str = "sum") -> torch.Tensor:
        """The cross entropy (fp32) of the last chunk's normed hidden states [batch, seq, hidden]
        against ``labels`` [batch, seq]: summed over tokens (``reduction`` "sum"), or per token as
        [batch, seq] ("none": 0 where ignored; minus the log-probability of each label).
        ``output_loss`` with muP's 1/m as its logit scale (one fewer pass over the hidden states than
        dividing them), ``chunk_tokens`` tokens of logits at a time (default
        ``self.loss_chunk_tokens``, then the kernels' rule)."""
        loss = self.output_loss(hidden.flatten(0, 1), self.output_weight, labels.reshape(-1),
                                logit_scale=1.0 / self.cfg.width_mult, ignore_index=ignore_index,
                                chunk_tokens=chunk_tokens or self.loss_chunk_tokens, reduction=reduction)
        return loss.view(labels.shape) if reduction == "none" else loss

    # -- the whole model -------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                      document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[batch, seq, hidden] final-normed hidden state, before muP's 1/m logit scale."""
        return self.hidden(input_ids, position_ids, document_ids)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fp32 logits [batch, seq, vocab] = (h / m) @ W_out^T."""
        # muP divides the final hidden state by m before the LM head; doing it here rather than on
        # the logits costs hidden_size instead of vocab_size multiplies per token.
        hidden = self.hidden(input_ids, position_ids, document_ids)
        return F.linear(hidden / self.cfg.width_mult, self.output_weight).float()

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
             chunk_tokens: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sum of token cross entropies in fp32, number of labels != ignore_index as int64)."""
        loss_sum = self.head_loss(self.hidden(input_ids), labels, ignore_index, chunk_tokens)
        return loss_sum, (labels != ignore_index).sum()
