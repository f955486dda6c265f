"""Checkpoint writes are atomic, round-trip exactly, and refuse what they cannot load with one clear error."""
import json
import os

import pytest
import torch

from megacpm.checkpoint import (CheckpointError, TrainerState, latest_checkpoint, list_checkpoints,
                                load_checkpoint, save_checkpoint)
from megacpm.io.atomic import atomic_directory, write_text_atomic
from megacpm.parallel.context import ParallelContext
from megacpm.train.train_module import TrainModule
from tests.tiny_run import LR, global_batches, make_config


def trained(seed, steps=2, dtype=torch.float32):
    """A tiny model after ``steps`` optimizer steps in one process (the trainer's own step)."""
    cfg = make_config()
    step = TrainModule(cfg, ParallelContext.single(), generator=torch.Generator().manual_seed(seed), param_dtype=dtype)
    for samples in global_batches(steps):
        step.step(samples, LR)
    return cfg, step


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    cfg, step = trained(0)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    save_checkpoint(tmp_path, cfg, step, TrainerState(step=2, optimizer_steps=2, consumed_samples=48, tokens=999))
    torch.rand(100)  # advance the RNG: load must restore it

    _, other = trained(1, steps=1)
    state = load_checkpoint(latest_checkpoint(tmp_path), cfg, other)
    assert state == TrainerState(step=2, optimizer_steps=2, consumed_samples=48, tokens=999)
    assert other.optimizer_steps == 2
    mine, theirs = step.model.params_by_name(), other.model.params_by_name()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    moments, loaded = step.optimizer.state_by_name(), other.optimizer.state_by_name()
    for name in mine:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[name][key], loaded[name][key]), (name, key)
    assert torch.equal(torch.rand(3), expected_draw)
    # Continuing after the load is continuing the original.
    batch = global_batches(3)[2]
    assert other.step(batch, LR) == step.step(batch, LR)


def test_bf16_run_saves_its_fp32_masters_and_resumes_exactly(tmp_path):
    cfg, step = trained(0, steps=3, dtype=torch.bfloat16)
    save_checkpoint(tmp_path, cfg, step, TrainerState(step=3, optimizer_steps=3))
    _, other = trained(1, steps=0, dtype=torch.bfloat16)
    load_checkpoint(latest_checkpoint(tmp_path), cfg, other)
    saved, loaded = step.optimizer.state_by_name(), other.optimizer.state_by_name()
    for name, param in step.model.params_by_name().items():
        assert param.dtype == torch.bfloat16
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert saved[name][key].dtype == torch.float32 and torch.equal(saved[name][key], loaded[name][key])
        assert torch.equal(param, other.model.params_by_name()[name])
    batch = global_batches(4)[3]
    assert other.step(batch, LR) == step.step(batch, LR)


def test_latest_rotation_and_keep(tmp_path):
    cfg, step = trained(0, steps=0)
    cfg.checkpoint.keep = 2
    for n in (1, 2, 3):
        save_checkpoint(tmp_path, cfg, step, TrainerState(step=n))
    assert list_checkpoints(tmp_path) == [2, 3]
    assert latest_checkpoint(tmp_path).name == "step_3"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_failed_directory_write_leaves_nothing(tmp_path):
    final = tmp_path / "step_7"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "half").write_text("partial")
            raise RuntimeError("crash in the middle of a save")
    assert list(tmp_path.iterdir()) == []


def test_atomic_text_replaces_whole(tmp_path):
    path = tmp_path / "latest"
    write_text_atomic(path, "step_1")
    write_text_atomic(path, "step_2")
    assert path.read_text() == "step_2" and os.listdir(tmp_path) == ["latest"]


def test_shape_mismatch_names_the_field(tmp_path):
    cfg, step = trained(0, steps=0)
    path = save_checkpoint(tmp_path, cfg, step, TrainerState(step=1))
    other = make_config()
    other.model.hidden_size = 64
    with pytest.raises(CheckpointError, match="model.hidden_size"):
        load_checkpoint(path, other, step)


def test_corrupted_files_are_named(tmp_path):
    cfg, step = trained(0, steps=0)
    path = save_checkpoint(tmp_path, cfg, step, TrainerState(step=1))
    meta = path / "trainer_state.json"
    good = meta.read_text()
    meta.write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        load_checkpoint(path, cfg, step)
    meta.write_text(json.dumps({**json.loads(good), "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(path, cfg, step)
    meta.write_text(good)
    shard = next((path / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="state"):
        load_checkpoint(path, cfg, step)


def test_dangling_latest_is_an_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_5")
    with pytest.raises(CheckpointError, match="step_5"):
        latest_checkpoint(tmp_path)
