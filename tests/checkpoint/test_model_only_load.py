"""A model without an optimizer (a frozen reference, an evaluation) loads a checkpoint's weights
under another layout, and leaves the RNG alone."""
import pytest
import torch

from megacpm.checkpoint import TrainerState, latest_checkpoint, load_model_weights, save_checkpoint
from megacpm.checkpoint.manager import CheckpointError
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.sharded_model import ShardedModel
from megacpm.train.train_module import TrainModule
from tests.distributed import run_distributed
from tests.tiny_run import LR, global_batches, make_config


def _train_and_save(run_dir, parallel):
    cfg = make_config(**parallel)
    ctx = ParallelContext.initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, timeout_s=120)
    module = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0))
    for batch in global_batches(2):
        module.step(batch, LR)
    save_checkpoint(run_dir, cfg, module, TrainerState(step=2, optimizer_steps=2))
    # The logits of the whole model after training, on one process: gathered from the full masters.
    return {name: state["master"] for name, state in module.optimizer.state_by_name().items()}


def test_frozen_model_loads_weights_saved_under_tp2(tmp_path):
    masters = run_distributed(_train_and_save, 2, args=(tmp_path, dict(tp=2)))
    cfg = make_config()
    frozen = ShardedModel(cfg.model, ParallelContext.single(), generator=torch.Generator().manual_seed(9))
    torch.manual_seed(5)
    expected_draw = torch.rand(2)
    torch.manual_seed(5)
    load_model_weights(latest_checkpoint(tmp_path), frozen)
    assert torch.equal(torch.rand(2), expected_draw)  # the RNG is the caller's
    for name, param in frozen.params_by_name().items():
        rank0, rank1 = masters[0][name], masters[1][name]
        # A TP-split weight is the concatenation of the two ranks' shards; a replicated one is either.
        if rank0.shape == param.shape:
            assert torch.equal(param, rank0), name
        else:
            dim = 0 if rank0.shape[0] != param.shape[0] else 1
            assert torch.equal(param, torch.cat([rank0, rank1], dim=dim)), name


def test_another_model_shape_is_refused(tmp_path):
    cfg = make_config()
    module = TrainModule(cfg, ParallelContext.single(), generator=torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path, cfg, module, TrainerState(step=1, optimizer_steps=1))
    other = make_config()
    other.model.intermediate_size = 64
    model = ShardedModel(other.model, ParallelContext.single())
    with pytest.raises(CheckpointError, match="model.intermediate_size is 48 in the checkpoint but 64"):
        load_model_weights(latest_checkpoint(tmp_path), model)
