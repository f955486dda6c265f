"""muP parameter groups: 2-D weights at lr / m, norm gains without weight decay; one AdamW step by hand."""
import torch
from torch import nn

from megacpm.config import ModelConfig, OptimConfig
from megacpm.optim import build_optimizer, param_groups, set_lr

M = 4  # hidden_size / dim_model_base below
MATRICES = [f"layers.{i}.{mod}.weight" for i in range(2) for mod in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
GAINS = [f"layers.{i}.{norm}.weight" for i in range(2)
         for norm in ("input_layernorm", "post_attention_layernorm")] + ["norm.weight"]


class Gain(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class NamedToy(nn.Module):
    """MiniCPM's parameter names, tiny shapes."""

    def __init__(self, tied=True, hidden=8, vocab=11):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList()
        for _ in range(2):
            layer = nn.Module()
            layer.input_layernorm, layer.post_attention_layernorm = Gain(hidden), Gain(hidden)
            layer.self_attn = nn.Module()
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, proj, nn.Linear(hidden, hidden, bias=False))
            layer.mlp = nn.Module()
            layer.mlp.gate_proj = nn.Linear(hidden, 2 * hidden, bias=False)
            layer.mlp.up_proj = nn.Linear(hidden, 2 * hidden, bias=False)
            layer.mlp.down_proj = nn.Linear(2 * hidden, hidden, bias=False)
            self.layers.append(layer)
        self.norm = Gain(hidden)
        if not tied:
            self.lm_head = nn.Linear(hidden, vocab, bias=False)


def model_cfg(**kw):
    return ModelConfig(hidden_size=1024, dim_model_base=256, **kw)  # m = 4


def by_name(model, optimizer, key):
    """Parameter name -> the value of ``key`` in the one optimizer group that holds it."""
    out = {}
    for name, p in model.named_parameters():
        holders = [g for g in optimizer.param_groups if any(q is p for q in g["params"])]
        assert len(holders) == 1, name
        out[name] = holders[0][key]
    return out


def test_matrix_lr_is_lr_over_m_and_gains_have_no_decay():
    model = NamedToy(tied=False)
    opt = build_optimizer(model, model_cfg(), OptimConfig(lr=0.01, weight_decay=0.1))
    set_lr(opt, 0.02)
    lrs, wds = by_name(model, opt, "lr"), by_name(model, opt, "weight_decay")
    for name in MATRICES + ["embed_tokens.weight", "lm_head.weight"]:
        assert lrs[name] == 0.02 / M and wds[name] == 0.1, name
    for name in GAINS:
        assert lrs[name] == 0.02 and wds[name] == 0.0, name
    assert [g["name"] for g in opt.param_groups] == ["matrix", "vector"]  # no empty embedding group


def test_lrs_are_scaled_before_the_first_set_lr():
    model = NamedToy()
    opt = build_optimizer(model, model_cfg(), OptimConfig(lr=0.01))
    lrs = by_name(model, opt, "lr")
    assert lrs["layers.0.mlp.up_proj.weight"] == 0.01 / M and lrs["norm.weight"] == 0.01


def test_embedding_rule_is_a_choice():
    model = NamedToy()
    opt = build_optimizer(model, model_cfg(mup_embedding_as_matrix=False), OptimConfig(weight_decay=0.1))
    set_lr(opt, 0.02)
    assert by_name(model, opt, "lr")["embed_tokens.weight"] == 0.02
    assert by_name(model, opt, "weight_decay")["embed_tokens.weight"] == 0.1
    assert by_name(model, opt, "name")["embed_tokens.weight"] == "embedding"
    assert by_name(model, opt, "lr")["layers.1.self_attn.o_proj.weight"] == 0.02 / M


def test_tied_head_follows_the_embedding_rule_whichever_name_comes_first():
    model = NamedToy()
    head = nn.Linear(8, 11, bias=False)
    head.weight = model.embed_tokens.weight
    wrapper = nn.Module()
    wrapper.lm_head = head  # registered before the embedding: named_parameters yields "lm_head.weight"
    wrapper.module = model
    groups = param_groups(wrapper, model_cfg(mup_embedding_as_matrix=False), OptimConfig())
    embedding = [g for g in groups if g["name"] == "embedding"]
    assert len(embedding) == 1 and embedding[0]["params"] == [model.embed_tokens.weight]


def test_standard_parametrisation_has_one_lr():
    model = NamedToy(tied=False)
    opt = build_optimizer(model, model_cfg(use_mup=False), OptimConfig())
    set_lr(opt, 0.03)
    assert set(by_name(model, opt, "lr").values()) == {0.03}


def test_each_parameter_once_even_when_tied():
    model = NamedToy()
    model.lm_head = nn.Linear(8, 11, bias=False)
    model.lm_head.weight = model.embed_tokens.weight  # tied: one Parameter, two names
    groups = param_groups(model, model_cfg(), OptimConfig())
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters())) == len(MATRICES) + len(GAINS) + 1
    assert all(set(g) == {"name", "params", "lr_scale", "weight_decay"} for g in groups)


def test_one_step_matches_adamw_by_hand():
    torch.manual_seed(0)
    model = NamedToy()
    cfg = OptimConfig(lr=0.01, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    opt = build_optimizer(model, model_cfg(), cfg)
    set_lr(opt, cfg.lr)
    matrix, vector = model.layers[0].self_attn.q_proj.weight, model.norm.weight
    with torch.no_grad():  # weights large enough that a wrong weight decay shows above the tolerance
        matrix.normal_(0.0, 2.0)
        vector.mul_(1.5)
    before = {"m": matrix.detach().clone(), "v": vector.detach().clone()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = {"m": matrix.grad.clone(), "v": vector.grad.clone()}
    opt.step()

    def adamw_first_step(param, grad, lr, wd):
        # Decoupled decay, then Adam: m = (1-b1) g, v = (1-b2) g^2, bias corrections 1-b1 and 1-b2.
        m_hat = (1 - cfg.beta1) * grad / (1 - cfg.beta1)
        v_hat = (1 - cfg.beta2) * grad.square() / (1 - cfg.beta2)
        return param * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + cfg.eps)

    torch.testing.assert_close(matrix.detach(), adamw_first_step(before["m"], grads["m"], 0.01 / M, 0.1))
    torch.testing.assert_close(vector.detach(), adamw_first_step(before["v"], grads["v"], 0.01, 0.0))
