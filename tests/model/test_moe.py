"""The MoE MLP against an independent per-token loop in float64 and the formulas of the routing,
the load-balancing loss, capacity and sparse upcycling."""
import math

import pytest
import torch
import torch.nn.functional as F

from megacpm.model.moe import MoEMLP, attach_aux_loss, capacity_keep, load_balancing_loss, route, z_loss

H, I, E, K = 8, 12, 4, 2


def make_layer(capacity_factor=None, seed=0):
    torch.manual_seed(seed)
    layer = MoEMLP(H, I, E, K, capacity_factor=capacity_factor)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer.double()


def per_token_reference(layer, x, keep=None):
    """For each token: softmax over all experts, top k, renormalised, the k SwiGLUs summed."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ layer.gate.weight.t(), -1)
        top = sorted(range(E), key=lambda e: -float(probs[e].detach()))[:K]
        total = sum(probs[e] for e in top)
        for j, e in enumerate(top):
            if keep is not None and not keep[t, j]:
                continue
            h = F.silu(layer.w1[e] @ x[t]) * (layer.w3[e] @ x[t])
            out[t] = out[t] + probs[e] / total * (layer.w2[e] @ h)
    return out


def test_output_and_gradients_equal_the_per_token_loop():
    layer = make_layer()
    x = torch.randn(10, H, dtype=torch.float64, requires_grad=True)
    got, routing, keep = layer(x)
    assert keep.all()
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(10, dtype=torch.float32))  # dropless: sum 1
    want = per_token_reference(layer, x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(got.square().sum(), [x, layer.w1, layer.w2, layer.gate.weight])
    refs = torch.autograd.grad(want.square().sum(), [x, layer.w1, layer.w2, layer.gate.weight])
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_routing_and_losses_against_the_formulas():
    logits = torch.randn(32, E, generator=torch.Generator().manual_seed(1))
    routing = route(logits, K)
    probs = torch.softmax(logits.double(), -1)
    top = probs.topk(K, -1)
    assert torch.equal(routing.experts, top.indices)
    torch.testing.assert_close(routing.weights.double(), top.values / top.values.sum(-1, keepdim=True))
    counts = torch.zeros(E, dtype=torch.float64)
    for e in top.indices.reshape(-1).tolist():
        counts[e] += 1
    expected = E * float((probs.mean(0) * counts / (32 * K)).sum())
    assert float(load_balancing_loss(routing, E)) == pytest_approx(expected)
    assert float(z_loss(routing)) == pytest_approx(float((torch.logsumexp(logits.double(), -1) ** 2).mean()))
    # Perfect balance (uniform probabilities, every expert equally loaded) gives exactly 1.
    uniform = route(torch.zeros(E, E), 1)
    uniform.experts = torch.arange(E)[:, None]
    assert float(load_balancing_loss(uniform, E)) == pytest_approx(1.0)


def pytest_approx(value):
    return pytest.approx(value, rel=1e-5, abs=1e-7)


def test_router_bias_changes_the_choice_not_the_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    routing = route(logits, 2, bias)
    assert sorted(routing.experts[0].tolist()) == [0, 2]
    probs = torch.softmax(logits, -1)[0]
    chosen = probs[routing.experts[0]]
    torch.testing.assert_close(routing.weights[0], chosen / chosen.sum())


def test_capacity_drops_the_assignments_past_it_in_token_order():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])  # expert 0 gets 4 of 8 assignments
    keep = capacity_keep(experts, 4, capacity_factor=1.0)  # capacity ceil(1.0 * 8 / 4) = 2
    seen = {}
    for t in range(4):
        for j in range(2):
            e = int(experts[t, j])
            seen[e] = seen.get(e, 0) + 1
            assert bool(keep[t, j]) == (seen[e] <= 2)
    layer = make_layer(capacity_factor=0.5)
    x = torch.randn(12, H, dtype=torch.float64)
    got, routing, keep = layer(x)
    assert not keep.all()
    torch.testing.assert_close(got, per_token_reference(layer, x, keep), rtol=1e-6, atol=1e-6)


def test_upcycled_experts_reproduce_the_dense_mlp():
    torch.manual_seed(3)
    gate, up, down = torch.randn(I, H), torch.randn(I, H), torch.randn(H, I)
    layer = MoEMLP(H, I, E, K)
    layer.upcycle_from(gate, up, down, router_std=0.1, generator=torch.Generator().manual_seed(0))
    x = torch.randn(9, H)
    dense = (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    torch.testing.assert_close(layer(x)[0], dense, rtol=1e-6, atol=1e-5)
    assert math.isclose(float(layer.gate.weight.std()), 0.1, rel_tol=0.5)


def test_attached_aux_loss_reaches_the_router_without_changing_the_output():
    layer = make_layer()
    x = torch.randn(6, H, dtype=torch.float64)
    out, routing, _ = layer(x)
    aux = load_balancing_loss(routing, E)
    attached = attach_aux_loss(out, aux, scale=0.01)
    assert torch.equal(attached, out)
    got = torch.autograd.grad(attached.sum(), layer.gate.weight)[0]
    out2, routing2, _ = layer(x)
    want = torch.autograd.grad(out2.sum() + 0.01 * load_balancing_loss(routing2, E), layer.gate.weight)[0]
    torch.testing.assert_close(got, want)
