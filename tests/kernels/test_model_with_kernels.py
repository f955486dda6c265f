"""The model wired to the kernels: the same logits and gradients with the interpreted Triton RMSNorm and
rotary (impl "auto" under TRITON_INTERPRET=1) as with the PyTorch path, both against an fp64 copy."""
import copy
import importlib

import pytest
import torch

from megacpm.config import ModelConfig
from megacpm.model import MiniCPM
from tolerance import assert_close_to_reference, dtype_atol

# The modules themselves: megacpm.kernels.rms_norm / .rotary as attributes are the functions.
rms_norm_module = importlib.import_module("megacpm.kernels.rms_norm")
rotary_module = importlib.import_module("megacpm.kernels.rotary")


def tiny_model() -> MiniCPM:
    cfg = ModelConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=50, dim_model_base=16, max_position_embeddings=64,
                      attention_impl="sdpa")
    model = MiniCPM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # gains away from 1, so the weight gradients of the norms matter
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def logits_and_grads(model: MiniCPM, ids: torch.Tensor, probe: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    (logits.double() * probe).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_logits_and_grads_match_the_torch_path(dtype, monkeypatch):
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    probe = torch.randn(2, 8, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    # fp64 truth: fp64 is not a kernel dtype, so "auto" runs the PyTorch path.
    truth_logits, truth_grads = logits_and_grads(copy.deepcopy(model).double(), ids, probe)

    low = copy.deepcopy(model).to(dtype)
    launches = {"rms_norm": 0, "rotary": 0}
    real_rms, real_rot = rms_norm_module.rms_norm_forward, rotary_module.rotary_launch

    def count_rms(*args, **kwargs):
        launches["rms_norm"] += 1
        return real_rms(*args, **kwargs)

    def count_rot(*args, **kwargs):
        launches["rotary"] += 1
        return real_rot(*args, **kwargs)

    monkeypatch.setattr(rms_norm_module, "rms_norm_forward", count_rms)
    monkeypatch.setattr(rotary_module, "rotary_launch", count_rot)
    kernel_logits, kernel_grads = logits_and_grads(low, ids, probe)
    # One layer: input, post-attention and final norm; q and k forward and backward.
    assert launches == {"rms_norm": 3, "rotary": 4}

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # "auto" now picks the PyTorch implementation
    torch_logits, torch_grads = logits_and_grads(low, ids, probe)
    assert launches == {"rms_norm": 3, "rotary": 4}

    scale = max(1.0, truth_logits.abs().max().item())
    assert_close_to_reference(kernel_logits, truth_logits, torch_logits, 2.0, dtype_atol(dtype, scale), name="logits")
    for name, truth in truth_grads.items():
        gscale = max(1.0, truth.abs().max().item())
        assert_close_to_reference(kernel_grads[name], truth, torch_grads[name], 2.0,
                                  dtype_atol(dtype, gscale) + 1e-6 * gscale, name=f"grad {name}")
