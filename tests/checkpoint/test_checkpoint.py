"""Checkpoint writes are atomic, round-trip exactly, and refuse what they cannot load with one clear error."""
import json
import os

import pytest
import torch
from torch import nn

from megacpm.checkpoint import (CheckpointError, TrainerState, latest_checkpoint, list_checkpoints,
                                load_checkpoint, save_checkpoint)
from megacpm.checkpoint.atomic import atomic_directory, write_text_atomic
from megacpm.config import Config


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.norm = nn.Parameter(torch.ones(5))

    def forward(self, x):
        return self.proj(x) * self.norm


def trained_toy(seed):
    torch.manual_seed(seed)
    model = Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(3):
        model(torch.randn(4, 6)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    cfg = Config()
    model, opt = trained_toy(0)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    save_checkpoint(tmp_path, cfg, model, opt, TrainerState(step=3, consumed_samples=48, tokens=999))
    torch.rand(100)  # advance the RNG: load must restore it

    other, other_opt = trained_toy(1)
    state = load_checkpoint(latest_checkpoint(tmp_path), cfg, other, other_opt)
    assert state == TrainerState(step=3, consumed_samples=48, tokens=999)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state_dict()["state"][0][key], other_opt.state_dict()["state"][0][key])
    assert torch.equal(torch.rand(3), expected_draw)


def test_latest_rotation_and_keep(tmp_path):
    cfg = Config()
    cfg.checkpoint.keep = 2
    model, opt = trained_toy(0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, cfg, model, opt, TrainerState(step=step))
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
    cfg = Config()
    model, opt = trained_toy(0)
    path = save_checkpoint(tmp_path, cfg, model, opt, TrainerState(step=1))
    other = Config()
    other.model.hidden_size = 512
    with pytest.raises(CheckpointError, match="model.hidden_size"):
        load_checkpoint(path, other, model, opt)


def test_corrupted_files_are_named(tmp_path):
    cfg = Config()
    model, opt = trained_toy(0)
    path = save_checkpoint(tmp_path, cfg, model, opt, TrainerState(step=1))
    meta = path / "trainer_state.json"
    good = meta.read_text()
    meta.write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        load_checkpoint(path, cfg, model, opt)
    meta.write_text(json.dumps({**json.loads(good), "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(path, cfg, model, opt)
    meta.write_text(good)
    shard = next((path / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="state"):
        load_checkpoint(path, cfg, model, opt)


def test_dangling_latest_is_an_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_5")
    with pytest.raises(CheckpointError, match="step_5"):
        latest_checkpoint(tmp_path)
