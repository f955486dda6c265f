"""An MoE training step in one process against an independent fp64 computation of the formulas:
the load-balancing and z losses of every layer and micro-batch (their metrics and their gradient
on each router), the router-bias update of auxiliary-loss-free balancing, and the capacity drops.

The router inputs are captured by forward hooks; the reference recomputes routing from them in
fp64 with plain torch (softmax over all experts, top-k, Switch's E * sum(importance * load), the
mean squared log-sum-exp), weights each micro-batch by its share of the step's tokens and sums
over layers. The auxiliary losses do not change the forward, so their gradient is the difference
of two steps' router gradients with and without them; on the last layer's router that is its own
term's gradient alone (an earlier router also gets the later layers' terms through its outputs).
"""
import math

import pytest
import torch

from megacpm.parallel.context import ParallelContext
from megacpm.train.train_module import TrainModule
from tests.tiny_run import GLOBAL_BATCH, LR, MICRO_BATCH, SEQ, global_batches, make_moe_config

E, K = 4, 2


def _module(**model):
    cfg = make_moe_config()
    for key, value in model.items():
        setattr(cfg.model, key, value)
    module = TrainModule(cfg, ParallelContext.single(torch.device("cpu")), generator=torch.Generator().manual_seed(0))
    return cfg, module


def _capture_router_inputs(module):
    """{layer: [router input of each forward, in order]} (one forward per micro-batch)."""
    captured = {index: [] for index in module.model.moe_layers()}
    for index, mlp in module.model.moe_layers().items():
        mlp.gate.register_forward_hook(lambda m, args, out, index=index: captured[index].append(args[0].detach()))
    return captured


def _reference_aux(inputs, gates, aux_coeff, z_coeff):
    """fp64: (sum over layers and micro-batches of w_b * (c_aux LB + c_z Z), per-layer LB and Z
    token-weighted over the step, {layer: assignments per expert})."""
    total, lb, zl, counts = 0.0, {}, {}, {}
    micro_batches = GLOBAL_BATCH // MICRO_BATCH
    for layer, xs in inputs.items():
        assert len(xs) == micro_batches
        lb[layer] = zl[layer] = 0.0
        counts[layer] = torch.zeros(E, dtype=torch.float64)
        for x in xs:
            weight = x.shape[0] / (GLOBAL_BATCH * SEQ)
            logits = x.double() @ gates[layer].T
            probs = torch.softmax(logits, -1)
            chosen = probs.topk(K, -1).indices
            count = torch.bincount(chosen.flatten(), minlength=E).double()
            balance = E * (probs.mean(0) * count / chosen.numel()).sum()
            z = torch.logsumexp(logits, -1).square().mean()
            total = total + weight * (aux_coeff * balance + z_coeff * z)
            lb[layer] += weight * float(balance.detach())
            zl[layer] += weight * float(z.detach())
            counts[layer] += count
    return total, lb, zl, counts


def _router_grads(**model):
    cfg, module = _module(**model)
    captured = _capture_router_inputs(module)
    metrics, _ = module.compute_gradients(global_batches(1)[0])
    grads = {index: mlp.gate.weight.main_grad.clone() for index, mlp in module.model.moe_layers().items()}
    gates = {index: mlp.gate.weight.detach().double() for index, mlp in module.model.moe_layers().items()}
    return cfg, metrics, grads, captured, gates


def test_aux_losses_and_their_router_gradient_match_an_fp64_reference():
    cfg, metrics, grads, captured, gates = _router_grads(moe_router_bias_update_rate=0.0)
    _, _, without, _, _ = _router_grads(moe_router_bias_update_rate=0.0, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=0.0)
    leaves = {layer: gate.clone().requires_grad_(True) for layer, gate in gates.items()}
    total, lb, zl, _ = _reference_aux(captured, leaves, cfg.model.moe_aux_loss_coeff, cfg.model.moe_z_loss_coeff)
    # The LM loss is divided by the step's label count; the aux loss is a token-weighted mean already.
    total.backward()
    assert metrics["moe/aux_loss"] == pytest.approx(sum(lb.values()) / len(lb), rel=1e-5)
    assert metrics["moe/z_loss"] == pytest.approx(sum(zl.values()) / len(zl), rel=1e-5)
    last = max(leaves)
    aux_grad, want = (grads[last] - without[last]).double(), leaves[last].grad
    assert want.abs().max() > 1e-4  # a gradient worth checking
    torch.testing.assert_close(aux_grad, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


def test_router_bias_moves_by_the_sign_rule_from_the_steps_counts():
    cfg, module = _module()
    captured = _capture_router_inputs(module)
    gates = {index: mlp.gate.weight.detach().double().clone() for index, mlp in module.model.moe_layers().items()}
    metrics = module.step(global_batches(1)[0], LR)
    _, _, _, counts = _reference_aux(captured, gates, 0.0, 0.0)
    rate = cfg.model.moe_router_bias_update_rate
    for index, mlp in module.model.moe_layers().items():
        expected = rate * torch.sign(counts[index].mean() - counts[index])
        assert expected.abs().sum() > 0
        torch.testing.assert_close(mlp.router_bias.double(), expected)
        load = counts[index] / counts[index].sum()
        assert metrics[f"moe/max_load/{index}"] == pytest.approx(float(load.max() * E), rel=1e-6)


def test_a_capacity_drops_the_assignments_past_it_in_token_order_and_counts_them():
    factor = 0.5
    cfg, module = _module(moe_capacity_factor=factor, moe_router_bias_update_rate=0.0)
    captured = _capture_router_inputs(module)
    gates = {index: mlp.gate.weight.detach().double().clone() for index, mlp in module.model.moe_layers().items()}
    metrics, _ = module.compute_gradients(global_batches(1)[0])
    dropped = assignments = 0
    for layer, xs in captured.items():
        for x in xs:
            chosen = torch.softmax(x.double() @ gates[layer].T, -1).topk(K, -1).indices
            capacity = math.ceil(factor * chosen.numel() / E)
            seen = [0] * E
            for expert in chosen.flatten().tolist():  # token-major: token t's before token t + 1's
                seen[expert] += 1
                dropped += seen[expert] > capacity
            assignments += chosen.numel()
    assert dropped > 0
    assert metrics["moe/dropped_fraction"] == pytest.approx(dropped / assignments, rel=1e-6)
