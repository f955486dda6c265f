"""Where a run computes and in which precision."""
from __future__ import annotations

import torch

from megacpm.config import Config


def resolve_device(cfg: Config) -> torch.device:
    wanted = cfg.train.device
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device: 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def param_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The parameters' and activations' dtype: bf16 on CUDA by default (with fp32 master weights,
    Adam state and gradient reductions in the optimizer: Megatron's --bf16), fp32 on CPU unless asked."""
    return torch.bfloat16 if cfg.train.uses_bf16(device.type) else torch.float32
