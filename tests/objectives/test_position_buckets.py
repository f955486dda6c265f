"""The loss by position (train.eval_position_buckets) against a float64 computation from a plain
PyTorch forward's full logits, and through the TrainModule's evaluation."""
import pytest
import torch

from megacpm.config import ModelConfig, ObjectiveConfig
from megacpm.data.batch import IGNORE_INDEX, Batch
from megacpm.model import MiniCPM
from megacpm.objectives import build_objective
from megacpm.objectives.lm import position_bucket_starts

CFG = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=61, max_position_embeddings=64)
SEQ, BUCKETS, EOD = 24, 4, 0


def _model():
    model = MiniCPM(CFG)
    model.init_weights(torch.Generator().manual_seed(3))
    return model


def _batch(document_mask: bool) -> Batch:
    g = torch.Generator().manual_seed(0)
    window = torch.randint(1, CFG.vocab_size, (3, SEQ + 1), generator=g)
    if document_mask:
        window[:, [5, 15]] = EOD
    batch = Batch.from_tokens(window)
    labels = batch.labels.clone()  # a view of the window, as the input ids are
    labels[0, -3:] = IGNORE_INDEX  # a row with padding: ignored tokens count nowhere
    batch = Batch(batch.input_ids, labels)
    return batch.with_document_mask(EOD) if document_mask else batch


def _expected(model, batch, buckets):
    """{first position: mean NLL} from fp64 logits, positions counted by hand (restarting after each
    end-of-document token when the batch has a document mask)."""
    model = model.double()
    with torch.no_grad():
        logits = model(batch.input_ids, batch.position_ids, batch.document_ids).double()
    model.float()
    nll = -torch.log_softmax(logits, -1).gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]
    starts = position_bucket_starts(buckets, SEQ)
    sums, counts = [0.0] * buckets, [0] * buckets
    for row in range(batch.num_rows):
        position = 0
        for t in range(SEQ):
            if batch.document_ids is not None and t > 0 and batch.input_ids[row, t - 1] == EOD:
                position = 0
            if batch.labels[row, t] != IGNORE_INDEX:
                b = max(i for i, s in enumerate(starts) if s <= position)
                sums[b] += float(nll[row, t])
                counts[b] += 1
            position += 1
    return {s: sums[b] / counts[b] for b, s in enumerate(starts) if counts[b]}


@pytest.mark.parametrize("kind", ["lm", "sft"])
@pytest.mark.parametrize("document_mask", [False, True])
@pytest.mark.parametrize("buckets", [BUCKETS, 5])  # 5 does not divide 24: buckets of 5 and 4 positions
def test_loss_by_position_matches_float64(kind, document_mask, buckets):
    model, batch = _model(), _batch(document_mask)
    objective = build_objective(ObjectiveConfig(kind=kind), position_buckets=buckets, seq_len=SEQ)
    hidden = model.hidden(batch.input_ids, batch.position_ids, batch.document_ids)
    loss_sum, stats = objective.loss(model, hidden, batch)
    metrics = objective.metrics({k: float(v) for k, v in stats.items()}, objective.normaliser(batch))
    expected = _expected(model, batch, buckets)
    got = {int(k.split("/")[1]): v for k, v in metrics.items() if k.startswith("loss_by_position/")}
    assert sorted(got) == sorted(expected)
    # With the mask no document is longer than 10 tokens: the buckets starting past position 9 hold
    # no token and are not reported (by window index they would be).
    starts = position_bucket_starts(buckets, SEQ)
    assert sorted(got) == ([s for s in starts if s <= 9] if document_mask else starts)
    for start, value in expected.items():
        assert got[start] == pytest.approx(value, rel=1e-5), start
    # The plain loss is unchanged by the buckets.
    plain = build_objective(ObjectiveConfig(kind=kind))
    plain_sum, _ = plain.loss(model, hidden, batch)
    assert float(loss_sum) == pytest.approx(float(plain_sum), rel=1e-6)


def test_evaluation_reports_it_and_training_does_not():
    from megacpm.parallel.context import ParallelContext
    from megacpm.train.train_module import TrainModule
    from tests.tiny_run import LR, global_batches, make_config

    cfg = make_config(seq_len=16)
    cfg.train.eval_position_buckets = 4
    module = TrainModule(cfg, ParallelContext.single(), generator=torch.Generator().manual_seed(0))
    batch = global_batches(1, seq_len=16)[0]
    evaluation = module.evaluate(batch)
    assert [k for k in evaluation if k.startswith("loss_by_position/")] == [f"loss_by_position/{s}" for s in (0, 4, 8, 12)]
    # The token-weighted mean of the buckets is the loss (every bucket holds 8 * 4 tokens here).
    buckets = [v for k, v in evaluation.items() if k.startswith("loss_by_position/")]
    assert sum(buckets) / len(buckets) == pytest.approx(evaluation["loss"], rel=1e-6)
    assert not any(k.startswith("loss_by_position/") for k in module.step(batch, LR))


def test_the_eval_tool_buckets_by_the_same_rule():
    from pathlib import Path

    from tests.support import imported_tool

    tool_path = Path(__file__).resolve().parents[2] / "tools" / "eval_long_context.py"
    for tool in imported_tool(tool_path, "eval_long_context_buckets"):
        losses = torch.arange(10, dtype=torch.float32)[None]
        means = tool.bucket_means(losses, torch.ones(1, 10, dtype=torch.bool), 3)
        # positions p with p * 3 // 10 == b: {0..3}, {4..6}, {7..9}
        assert means == pytest.approx([1.5, 5.0, 8.0])
