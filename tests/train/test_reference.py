"""score_rows (DPO's reference scoring) against a plain fp64 forward of the same weights."""
import torch

from megacpm.config import load_config
from megacpm.data.batch import IGNORE_INDEX, Batch
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.sharded_model import ShardedModel
from megacpm.train.reference import score_rows

OVERRIDES = ["--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
             "--model.num_attention_heads=4", "--model.num_key_value_heads=2", "--model.vocab_size=61"]


def test_score_rows_equals_fp64_log_probabilities_and_ignores_micro_batching():
    cfg = load_config("tiny", OVERRIDES)
    ctx = ParallelContext.initialize(1, 1, 1, device_type="cpu")
    model = ShardedModel(cfg.model, ctx, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 61, (6, 12), generator=g)
    labels = torch.roll(ids, -1, dims=1).clone()
    labels[:, :5] = IGNORE_INDEX
    labels[5] = IGNORE_INDEX  # a row without labels scores 0
    batch = Batch(ids, labels)
    whole = model.chunks[0]
    with torch.no_grad():
        logits = whole.double()(ids).double()
    whole.float()
    picked = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    expected = (picked * (labels != IGNORE_INDEX)).sum(1)
    for micro_rows in (2, 4):  # 4 does not divide 6: the batch is padded, the padding dropped
        scores = score_rows(model, ctx, batch, micro_rows)
        assert scores.shape == (6,) and scores.dtype == torch.float64
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert scores[5] == 0
