"""muP parameter groups: 2-D weights at lr / m, norm gains without weight decay; one AdamW step by hand."""
import math

import pytest
import torch
from torch import nn

from megacpm.config import ModelConfig, OptimConfig
from megacpm.optim import build_optimizer, param_groups, set_lr


class NamedToy(nn.Module):
    """The parameter names of MiniCPM, tiny shapes."""

    def __init__(self, tied=True):
        super().__init__()
        self.embed_tokens = nn.Embedding(11, 8)
        self.layers = nn.ModuleList([nn.Module()])
        layer = self.layers[0]
        layer.input_layernorm = nn.Module()
        layer.input_layernorm.weight = nn.Parameter(torch.ones(8))
        layer.self_attn = nn.Module()
        layer.self_attn.q_proj = nn.Linear(8, 8, bias=False)
        layer.mlp = nn.Module()
        layer.mlp.down_proj = nn.Linear(16, 8, bias=False)
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(8))
        if not tied:
            self.lm_head = nn.Linear(8, 11, bias=False)


def model_cfg(**kw):
    return ModelConfig(hidden_size=1024, dim_model_base=256, **kw)  # m = 4


def lrs_by_param(model, optimizer):
    return {name: g["lr"] for name, p in model.named_parameters()
            for g in optimizer.param_groups if any(q is p for q in g["params"])}


def test_matrix_lr_is_lr_over_m():
    model = NamedToy(tied=False)
    opt = build_optimizer(model, model_cfg(), OptimConfig(lr=0.01))
    set_lr(opt, 0.01)
    lrs = lrs_by_param(model, opt)
    for name in ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight",
                 "lm_head.weight"):
        assert lrs[name] == 0.01 / 4
    assert lrs["norm.weight"] == lrs["layers.0.input_layernorm.weight"] == 0.01
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"matrix": 0.1, "vector": 0.0}


def test_embedding_rule_is_a_choice():
    model = NamedToy()
    opt = build_optimizer(model, model_cfg(mup_embedding_as_matrix=False), OptimConfig())
    set_lr(opt, 0.02)
    assert lrs_by_param(model, opt)["embed_tokens.weight"] == 0.02


def test_standard_parametrisation_has_one_lr():
    model = NamedToy()
    opt = build_optimizer(model, model_cfg(use_mup=False), OptimConfig())
    set_lr(opt, 0.03)
    assert set(lrs_by_param(model, opt).values()) == {0.03}


def test_each_parameter_once_even_when_tied():
    model = NamedToy()
    model.lm_head_alias = model.embed_tokens  # the same Parameter reachable twice
    groups = param_groups(model, model_cfg(), OptimConfig())
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(set(map(id, model.parameters())))


def test_one_step_matches_adamw_by_hand():
    torch.manual_seed(0)
    model = NamedToy()
    cfg = OptimConfig(lr=0.01, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    opt = build_optimizer(model, model_cfg(), cfg)
    set_lr(opt, cfg.lr)
    matrix, vector = model.layers[0].self_attn.q_proj.weight, model.norm.weight
    before = {"m": matrix.detach().clone(), "v": vector.detach().clone()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = {"m": matrix.grad.clone(), "v": vector.grad.clone()}
    opt.step()

    def adamw(param, grad, lr, wd):
        # First step: m_hat = g, v_hat = g^2 after bias correction.
        m_hat = (1 - cfg.beta1) * grad / (1 - cfg.beta1)
        v_hat = (1 - cfg.beta2) * grad.square() / (1 - cfg.beta2)
        return param * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + cfg.eps)

    torch.testing.assert_close(matrix.detach(), adamw(before["m"], grads["m"], 0.01 / 4, 0.1))
    torch.testing.assert_close(vector.detach(), adamw(before["v"], grads["v"], 0.01, 0.0))
