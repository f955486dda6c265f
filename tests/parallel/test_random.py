"""The tensor-parallel RNG: independent streams per TP rank inside, the shared stream kept in step
outside, and recomputation (activation checkpointing) replays the same dropout masks."""
import functools

import torch

from megacpm.config import ModelConfig
from megacpm.model import MiniCPM
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.random import tensor_parallel_rng
from megacpm.train.train_module import TrainModule
from tests.distributed import run_distributed
from tests.tiny_run import LR, global_batches, make_config

CPU = torch.device("cpu")


def draws(tp_rank):
    torch.manual_seed(123)
    with tensor_parallel_rng(tp_rank, CPU):
        inside = torch.rand(4)
    return inside, torch.rand(4)


def test_ranks_draw_apart_inside_and_together_after():
    inside0, after0 = draws(0)
    inside1, after1 = draws(1)
    assert not torch.equal(inside0, inside1)
    assert torch.equal(after0, after1)
    assert torch.equal(draws(1)[0], inside1)  # a pure function of the shared stream and the rank


def gradients(checkpointing, seed=7):
    cfg = ModelConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, dim_model_base=8, attention_dropout=0.3)
    model = MiniCPM(cfg, activation_checkpointing=checkpointing)
    model.init_weights(torch.Generator().manual_seed(0))
    for layer in model.layers:
        layer.self_attn.dropout_rng = functools.partial(tensor_parallel_rng, 1)  # as in a tensor-parallel region
    model.train()
    torch.manual_seed(seed)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_recomputation_replays_the_same_dropout_masks():
    loss, grads = gradients(checkpointing=False)
    loss_again, grads_again = gradients(checkpointing=True)
    assert torch.equal(loss, loss_again)
    for name in grads:
        assert torch.equal(grads[name], grads_again[name]), name
    assert not torch.equal(gradients(False, seed=8)[0], loss)  # the masks matter: another stream, another loss


def _train_with_dropout():
    cfg = make_config(tp=2)
    cfg.model.attention_dropout = 0.2
    ctx = ParallelContext.initialize(tp=2, timeout_s=120)
    step = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    losses = [step.step(batch, LR)["loss"] for batch in global_batches(2)]
    with tensor_parallel_rng(ctx.tp_rank, CPU):
        own = torch.rand(3)
    return losses, own, torch.rand(3)


def test_tp_ranks_stay_in_step_with_dropout():
    (losses0, own0, shared0), (losses1, own1, shared1) = run_distributed(_train_with_dropout, 2)
    assert losses0 == losses1
    assert torch.equal(shared0, shared1)  # the replicated stream did not drift
    assert not torch.equal(own0, own1)
