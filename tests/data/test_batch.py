"""Batch: labels made once from token windows, row-aligned splits, padding that changes no loss,
and shard_batch against a plain slicing of the global batch."""
import pytest
import torch

from megacpm.data.batch import IGNORE_INDEX, Batch, shard_batch


def windows(rows=4, seq=8):
    return torch.arange(rows * (seq + 1)).reshape(rows, seq + 1)


def test_from_tokens_shifts_once():
    w = windows()
    batch = Batch.from_tokens(w)
    assert torch.equal(batch.input_ids, w[:, :-1]) and torch.equal(batch.labels, w[:, 1:])
    assert batch.num_loss_tokens() == 4 * 8
    with pytest.raises(ValueError, match="seq \\+ 1"):
        Batch.from_tokens(torch.zeros(3, 1, dtype=torch.long))


def test_fields_must_be_aligned():
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        Batch(ids, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="extras"):
        Batch(ids, ids, extras={"pair": torch.zeros(3)})


def test_rows_split_every_field_alike():
    w = windows()
    batch = Batch(w[:, :-1], w[:, 1:], position_ids=w[:, :-1] * 10, extras={"pair": torch.tensor([0, 0, 1, 1])})
    parts = batch.split_rows(3)
    assert [p.num_rows for p in parts] == [3, 1]
    assert torch.equal(parts[1].position_ids, w[3:, :-1] * 10)
    assert torch.equal(parts[1].extras["pair"], torch.tensor([1]))


def test_pad_rows_adds_ignored_rows_only():
    batch = Batch.from_tokens(windows(3))
    padded = batch.pad_rows(4)
    assert padded.num_rows == 4 and padded.num_loss_tokens() == batch.num_loss_tokens()
    assert torch.equal(padded.rows(0, 3).labels, batch.labels)
    assert bool((padded.labels[3] == IGNORE_INDEX).all())


def test_shard_batch_data_parallel_rows():
    batch = Batch.from_tokens(windows(4))
    shards = [shard_batch(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([s.input_ids for s in shards]), batch.input_ids)
    with pytest.raises(ValueError, match="3 data-parallel"):
        shard_batch(batch, 0, 3)


def test_shard_batch_context_parallel_is_load_balanced_and_keeps_positions():
    batch = Batch.from_tokens(windows(2, seq=8))  # 2 * cp = 4 chunks of 2 tokens
    shards = [shard_batch(batch, 0, 1, cp_rank=r, cp_size=2) for r in range(2)]
    # rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2 (causal work balanced)
    assert shards[0].position_ids[0].tolist() == [0, 1, 6, 7]
    assert shards[1].position_ids[0].tolist() == [2, 3, 4, 5]
    for shard in shards:
        assert torch.equal(shard.input_ids, batch.input_ids.gather(1, shard.position_ids))
        assert torch.equal(shard.labels, batch.labels.gather(1, shard.position_ids))
    with pytest.raises(ValueError, match="2 \\* cp"):
        shard_batch(Batch.from_tokens(windows(2, seq=6)), 0, 1, cp_rank=0, cp_size=2)
