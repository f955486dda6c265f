"""ParamSpec: frozen, strict, counted once; and the TP plans declare every parameter or refuse."""
import pytest
import torch
from torch import nn

from megacpm.config import ModelConfig
from megacpm.model import MiniCPM
from megacpm.parallel.param_spec import ParamSpec, param_spec, set_param_spec
from megacpm.parallel.plans import ShardingError, TP_PLANS, apply_tensor_parallel


def test_spec_is_frozen_and_strict():
    spec = ParamSpec(shard_dims={"tp": 0})
    with pytest.raises(Exception):
        spec.reduced_over = "tp"  # frozen
    with pytest.raises(TypeError):
        ParamSpec(tp_shard_dim=0)  # an unknown field is an error, not a default
    with pytest.raises(TypeError):
        spec.with_changes(shard_dim=1)
    with pytest.raises(ValueError, match="padded_rows"):
        ParamSpec(padded_rows=(7, 3))  # padding only along a dim-0 TP split


def test_an_unannotated_parameter_is_an_error():
    with pytest.raises(KeyError, match="no ParamSpec"):
        param_spec(nn.Parameter(torch.zeros(2, 2)))
    p = nn.Parameter(torch.zeros(2))
    set_param_spec(p, ParamSpec(partial_over=("tp",)))
    assert param_spec(p).partial_over == ("tp",)


@pytest.mark.parametrize("spec, coords, counted", [
    (ParamSpec(shard_dims={"tp": 0}), {"tp": 1, "cp": 0}, True),  # split: every rank's part counts
    (ParamSpec(), {"tp": 1, "cp": 0}, False),  # replicated over tp: rank 0 only
    # cp ranks are reduced with the replicas (dp_cp): each counts its own reduced copy or ZeRO slice
    (ParamSpec(), {"tp": 0, "cp": 1}, True),
    (ParamSpec(), {"tp": 0, "cp": 0, "dp": 3, "pp": 1}, True),
    (ParamSpec(shard_dims={"tp": 0}, copy_of="embed_tokens.weight"), {"tp": 0}, False),  # a copy: never
])
def test_counted_once_in_the_norm(spec, coords, counted):
    assert spec.counted_in_norm(coords) is counted


class Adapter(nn.Module):
    """A module type no plan knows, holding a dense layer."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32, bias=False)


def _tiny():
    return MiniCPM(ModelConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=64, dim_model_base=8))


def test_a_module_no_plan_covers_is_an_error_under_tp(monkeypatch):
    from megacpm.parallel import plans

    monkeypatch.setattr(plans, "group_size", lambda group: 2)
    monkeypatch.setattr(plans.TensorParallel, "rank", property(lambda self: 0))
    monkeypatch.setattr("megacpm.parallel.layers.group_size", lambda group: 2)
    monkeypatch.setattr("megacpm.parallel.layers._rank", lambda group: 0)
    model = _tiny()
    model.layers[0].adapter = Adapter()
    with pytest.raises(ShardingError, match="layers.0.adapter.proj: a Linear that no tensor-parallel plan covers"):
        apply_tensor_parallel(model, None)
    model = _tiny()
    model.layers[0].extra = nn.Parameter(torch.zeros(32, 32))
    with pytest.raises(ShardingError, match="layers.0.extra: a parameter of shape"):
        apply_tensor_parallel(model, None)
    model = _tiny()
    apply_tensor_parallel(model, None)  # every built-in module type has a plan
    assert set(TP_PLANS) >= {type(model), type(model.layers[0])}
    assert param_spec(model.layers[0].self_attn.q_proj.weight).shard_dims == {"tp": 0}
    assert param_spec(model.layers[0].mlp.down_proj.weight).shard_dims == {"tp": 1}
    assert param_spec(model.layers[0].self_attn.k_proj.weight).shard_dims == {"tp": 0}  # 2 kv heads over 2
