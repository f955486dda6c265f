"""train.init_from in a training step: the first step from loaded weights is the step a fresh
optimizer takes from those weights (the optimizer's masters follow the load)."""
import torch

from megacpm.checkpoint import TrainerState, resolve_init_source, save_checkpoint
from megacpm.parallel.context import ParallelContext
from megacpm.train.train_module import TrainModule
from tests.tiny_run import LR, global_batches, make_config


def _module(cfg, ctx, seed):
    return TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(seed))


def test_loaded_weights_train_like_a_fresh_optimizer_on_them(tmp_path):
    cfg = make_config()
    cfg.run.dir = str(tmp_path / "source")
    ctx = ParallelContext.initialize(1, 1, 1, device_type="cpu")
    batch = global_batches(1)[0]
    source = _module(cfg, ctx, seed=0)
    save_checkpoint(tmp_path / "source", cfg, source, TrainerState(step=5, optimizer_steps=5))

    loaded = _module(cfg, ctx, seed=1)  # other initial weights, replaced by the load
    loaded.load_initial_weights(resolve_init_source(str(tmp_path / "source")))
    expected = _module(cfg, ctx, seed=0).step(batch, LR)
    got = loaded.step(batch, LR)
    assert got["loss"] == expected["loss"] and got["grad_norm"] == expected["grad_norm"]
    after = _module(cfg, ctx, seed=0)
    after.step(batch, LR)
    for (name, a), b in zip(after.model.params_by_name().items(), loaded.model.params_by_name().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert loaded.optimizer_steps == 1
