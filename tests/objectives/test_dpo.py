"""The DPO objective against an independent float64 computation from a plain PyTorch forward."""
import math

import pytest
import torch

from megacpm.config import ModelConfig
from megacpm.data.batch import IGNORE_INDEX, Batch
from megacpm.model import MiniCPM
from megacpm.config import ObjectiveConfig
from megacpm.objectives import DirectPreferenceOptimization, SupervisedFineTuning, build_objective
from megacpm.objectives.dpo import REFERENCE_LOGPS

CFG = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=61, max_position_embeddings=64)


def _model(seed):
    model = MiniCPM(CFG)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def _pairs(num_pairs=3, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CFG.vocab_size, (2 * num_pairs, seq), generator=g)
    labels = torch.roll(ids, -1, dims=1).clone()
    prompt = 4
    labels[:, :prompt - 1] = IGNORE_INDEX  # the completion starts after the prompt
    labels[1::2, -2:] = IGNORE_INDEX  # rejected rows are shorter (padding)
    return Batch(ids, labels)


def _logps_fp64(model, batch):
    """Per-row summed log p(label) from the model's full fp64 logits."""
    model64 = model.double()
    with torch.no_grad():
        logits = model64(batch.input_ids).double()
    model.float()
    logp = torch.log_softmax(logits, dim=-1)
    mask = batch.labels != IGNORE_INDEX
    picked = logp.gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]
    return (picked * mask).sum(dim=1)


def _objective_value(objective, model, batch):
    hidden = model.hidden(batch.input_ids)
    loss_sum, stats = objective.loss(model, hidden, batch)
    normaliser = objective.normaliser(batch)
    return loss_sum, objective.metrics({k: float(v) for k, v in stats.items()}, normaliser)


@pytest.mark.parametrize("loss, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_loss_and_metrics_match_float64_formula(loss, smoothing):
    policy, reference = _model(1), _model(2)
    batch = _pairs()
    ref = _logps_fp64(reference, batch)
    batch.extras[REFERENCE_LOGPS] = ref.float()
    beta = 0.3
    objective = DirectPreferenceOptimization(beta, loss, smoothing)
    _, metrics = _objective_value(objective, policy, batch)

    pol = _logps_fp64(policy, batch)
    chosen, rejected = pol[0::2] - ref[0::2], pol[1::2] - ref[1::2]
    h = chosen - rejected
    if loss == "sigmoid":
        expected = -(1 - smoothing) * torch.nn.functional.logsigmoid(beta * h) \
            - smoothing * torch.nn.functional.logsigmoid(-beta * h)
    elif loss == "ipo":
        expected = (h - 1 / (2 * beta)) ** 2
    else:
        expected = torch.relu(1 - beta * h)
    tol = dict(rel_tol=1e-4, abs_tol=1e-4)
    assert math.isclose(metrics["loss"], float(expected.mean()), **tol)
    assert math.isclose(metrics["rewards/chosen"], float(beta * chosen.mean()), **tol)
    assert math.isclose(metrics["rewards/rejected"], float(beta * rejected.mean()), **tol)
    assert math.isclose(metrics["rewards/margins"], float(beta * h.mean()), **tol)
    assert metrics["rewards/accuracies"] == pytest.approx(float((chosen > rejected).double().mean()))
    assert math.isclose(metrics["logps/chosen"], float(pol[0::2].mean()), rel_tol=1e-5)
    assert math.isclose(metrics["logps/rejected"], float(pol[1::2].mean()), rel_tol=1e-5)


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    policy = _model(1)
    batch = _pairs()
    batch.extras[REFERENCE_LOGPS] = _logps_fp64(policy, batch).float()
    _, metrics = _objective_value(DirectPreferenceOptimization(0.1), policy, batch)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(metrics[key]) < 1e-5


def test_padding_pairs_count_for_nothing_and_gradient_matches_autograd_fp64():
    policy, reference = _model(1), _model(2)
    batch = _pairs(num_pairs=2)
    batch.extras[REFERENCE_LOGPS] = _logps_fp64(reference, batch).float()
    padded = batch.pad_rows(6)
    objective = DirectPreferenceOptimization(0.1)
    _, plain = _objective_value(objective, policy, batch)
    _, with_padding = _objective_value(objective, policy, padded)
    assert objective.normaliser(padded) == 2
    assert with_padding == pytest.approx(plain, abs=1e-6)

    # The per-token path's gradient (fused loss, reduction none) equals full-logit autograd.
    loss_sum, _ = objective.loss(policy, policy.hidden(batch.input_ids), batch)
    grads = torch.autograd.grad(loss_sum, list(policy.parameters()))
    logits = policy(batch.input_ids)
    logp = torch.log_softmax(logits, -1).gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]
    seq = (logp * (batch.labels != IGNORE_INDEX)).sum(1)
    ref = batch.extras[REFERENCE_LOGPS]
    h = (seq[0::2] - ref[0::2]) - (seq[1::2] - ref[1::2])
    expected = -torch.nn.functional.logsigmoid(0.1 * h).sum()
    for got, want in zip(grads, torch.autograd.grad(expected, list(policy.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_build_objective_by_kind():
    assert isinstance(build_objective(ObjectiveConfig(kind="sft")), SupervisedFineTuning)
    dpo = build_objective(ObjectiveConfig(kind="dpo", beta=0.5, loss="hinge"))
    assert (dpo.beta, dpo.loss_type, dpo.rows_per_sample) == (0.5, "hinge", 2)
