"""Rotary position embedding (RoPE) of MiniCPM: cos/sin tables and the rotation itself.

The tables are fp32 and use the released code's "rotate-half" layout: the half-width table of
angles ``position * inv_freq`` is repeated twice to width ``head_dim``. The 128K model's
``rope_scaling = {type: dynamic, factor: F}`` (NTK-aware) raises the base once a sequence is longer
than ``max_position_embeddings``; shorter sequences use ``rope_theta`` unchanged.

``apply_rotary`` is the single place the rotation happens, so a fused kernel can replace it.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from megacpm import kernels
from megacpm.config import ModelConfig

# Distinct (seq_len, device) tables kept per RotaryEmbedding. Training uses one or two lengths;
# the bound only stops evaluation at many lengths from growing the cache without limit.
_MAX_CACHED_TABLES = 8


def rope_base(cfg: ModelConfig, seq_len: int) -> float:
    """The RoPE base for a sequence of ``seq_len`` tokens (dynamic NTK scaling when configured).

    base = rope_theta * ((F * L / P) - (F - 1)) ** (d / (d - 2))   when L > P, else rope_theta,
    with F the scaling factor, P = max_position_embeddings and d = head_dim.
    """
    scaling = cfg.rope_scaling
    if scaling is None or seq_len <= cfg.max_position_embeddings:
        return float(cfg.rope_theta)
    factor = float(scaling["factor"])
    dim = cfg.head_dim
    stretch = factor * seq_len / cfg.max_position_embeddings - (factor - 1.0)
    return float(cfg.rope_theta) * stretch ** (dim / (dim - 2))


def inverse_frequencies(base: float, head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """inv_freq[i] = 1 / base ** (2i / head_dim) for i < head_dim / 2, fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (base ** exponents)


def rotary_tables(base: float, head_dim: int, seq_len: int,
                  device: torch.device | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin tables of shape [seq_len, head_dim] for positions 0 .. seq_len - 1."""
    inv_freq = inverse_frequencies(base, head_dim, device)
    positions = torch.arange(seq_len, dtype=torch.int64, device=device).float()
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # rotate-half layout: both halves share a frequency
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k ([batch, seq, heads, head_dim]) by the [seq, head_dim] tables, or by
    per-token tables [batch, seq, head_dim] (position ids: packed samples restart at 0).

    The rotation runs in (at least) fp32, as in the released MiniCPM code, and the result is cast
    back to the input dtype, so bf16 activations lose no precision in the angles. It is
    megacpm.kernels.rotary (impl "auto": the Triton kernel on CUDA or under TRITON_INTERPRET=1,
    PyTorch otherwise), which takes the half-width tables: both halves of ours are equal.
    """
    half = q.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    return kernels.rotary(q, cos, sin), kernels.rotary(k, cos, sin)


class RotaryEmbedding(nn.Module):
    """Serves (cos, sin) tables for a sequence length, cached per (seq_len, device).

    Holds no parameters or buffers, so it adds nothing to the state dict and follows the
    activations' device on demand.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self._tables: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, seq_len: int, device: torch.device | str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        key = (seq_len, str(device))
        tables = self._tables.get(key)
        if tables is None:
            if len(self._tables) >= _MAX_CACHED_TABLES:
                self._tables.clear()
            base = rope_base(self.cfg, seq_len)
            # Built on the CPU so the angles are bit-identical on every device, then moved.
            cos, sin = rotary_tables(base, self.cfg.head_dim, seq_len)
            tables = (cos.to(device), sin.to(device))
            self._tables[key] = tables
        return tables
