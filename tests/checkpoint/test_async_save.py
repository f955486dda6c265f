"""Asynchronous checkpoints: the state is captured when the save starts (training may change the
weights meanwhile), the files equal a synchronous save's, and a run resumes from them exactly."""
import shutil

import pytest
import torch

from megacpm.checkpoint import (TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint_async)
from megacpm.parallel.context import ParallelContext
from megacpm.train.train_module import TrainModule
from tests.distributed import run_distributed
from tests.support import run_cli
from tests.tiny_run import LR, global_batches, make_config
from tests.train.test_training_run import SMALL, losses

pytestmark = pytest.mark.slow


def _save_while_training(parallel, run_dir):
    cfg = make_config(**parallel)
    ctx = ParallelContext.initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, timeout_s=120)
    step = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0))
    batches = global_batches(4)
    for batch in batches[:2]:
        step.step(batch, LR)
    at_save = {name: state["master"].clone() for name, state in step.optimizer.state_by_name().items()}
    pending = save_checkpoint_async(run_dir, cfg, step, TrainerState(step=2, optimizer_steps=2))
    for batch in batches[2:]:  # training goes on while the files are written
        step.step(batch, LR)
    assert latest_checkpoint(run_dir) is None  # not published before finish()
    pending.finish()
    fresh = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(1))
    load_checkpoint(latest_checkpoint(run_dir), cfg, fresh)
    loaded = {name: state["master"] for name, state in fresh.optimizer.state_by_name().items()}
    return all(torch.equal(loaded[name], at_save[name]) for name in at_save), fresh.optimizer_steps


@pytest.mark.parametrize("world, parallel", [(1, dict()), (4, dict(tp=2, zero1=True))], ids=["one", "tp2-dp2-zero1"])
def test_async_save_captures_the_state_at_its_start(tmp_path, world, parallel):
    for same, optimizer_steps in run_distributed(_save_while_training, world, args=(parallel, tmp_path)):
        assert same and optimizer_steps == 2


def test_async_run_equals_sync_run_and_resumes_exactly(tmp_path, data_cache):
    args = ["train", "tiny", f"--data.cache_dir={data_cache}", *SMALL, "--train.steps=6", "--checkpoint.interval=2",
            "--checkpoint.keep=0", "--train.log_interval=1", "--schedule.kind=constant"]
    sync = run_cli(*args, f"--run.dir={tmp_path / 'sync'}")
    background = run_cli(*args, f"--run.dir={tmp_path / 'async'}", "--checkpoint.async_save=true")
    assert sync.returncode == 0 and background.returncode == 0, background.stderr
    assert losses(tmp_path / "async") == losses(tmp_path / "sync")
    assert latest_checkpoint(tmp_path / "async").name == "step_6"
    # Resume from the background-written step 4: steps 5 and 6 again, identically.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "async" / "checkpoints" / "step_4", resumed / "checkpoints" / "step_4")
    (resumed / "checkpoints" / "latest").write_text("step_4")
    result = run_cli(*args, f"--run.dir={resumed}", "--checkpoint.async_save=true")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    assert {s: v for s, v in losses(resumed).items() if s > 4} == {s: v for s, v in losses(tmp_path / "sync").items() if s > 4}
