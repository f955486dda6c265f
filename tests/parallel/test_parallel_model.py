"""The TP/SP-sharded MiniCPM over 2 gloo ranks computes the single-process hidden states and gradients."""
import pytest
import torch
import torch.distributed as dist

from megacpm.config import ModelConfig
from megacpm.model import MiniCPM
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.param_spec import param_spec
from megacpm.parallel.sharded_model import ShardedModel
from tests.distributed import run_distributed

BATCH, SEQ = 2, 8


def model_cfg(kv_heads):
    return ModelConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=kv_heads, vocab_size=64, dim_model_base=8)


def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 64, (BATCH, SEQ), generator=g), torch.randn(BATCH, SEQ, 32, generator=g)


def reference(kv_heads):
    model = MiniCPM(model_cfg(kv_heads))
    model.init_weights(torch.Generator().manual_seed(0))
    ids, upstream = batch()
    h = model.hidden_states(ids)
    (h * upstream).sum().backward()
    return h.detach(), {n: p.grad for n, p in model.named_parameters()}


def _tp_forward_backward(kv_heads, sequence_parallel):
    ctx = ParallelContext.initialize(tp=2, timeout_s=60)
    (stage,) = ShardedModel(model_cfg(kv_heads), ctx, sequence_parallel=sequence_parallel,
                            generator=torch.Generator().manual_seed(0)).chunks
    ids, upstream = batch()
    h = stage.hidden(ids)
    # The final norm enters the TP region for the LM head, whose backward sums the ranks' partial
    # input gradients; this replicated stand-in for the head must therefore contribute 1/tp each.
    (h * upstream / 2).sum().backward()
    tp_group = ctx.group("tp")
    grads = {}
    for name, p in stage.named_parameters():
        grad = p.grad.clone()
        if "tp" in param_spec(p).partial_over:
            dist.all_reduce(grad, group=tp_group)  # what the trainer does for partial gradients
        grads[name] = (grad, param_spec(p).shard_dim("tp"))
    return h.detach(), grads


@pytest.mark.parametrize("kv_heads, sequence_parallel", [(2, False), (2, True), (1, False)])
def test_tp2_hidden_states_and_grads(kv_heads, sequence_parallel):
    h_ref, grads_ref = reference(kv_heads)
    results = run_distributed(_tp_forward_backward, 2, args=(kv_heads, sequence_parallel))
    for rank, (h, grads) in enumerate(results):
        torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)
        assert set(grads) == set(grads_ref)  # model-space names survive sharding
        for name, (grad, dim) in grads.items():
            want = grads_ref[name] if dim is None else grads_ref[name].chunk(2, dim)[rank]
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6, msg=name)
