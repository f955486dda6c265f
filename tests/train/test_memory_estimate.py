"""`megacpm info`'s loss-head figure is the memory the loss head really holds when it trains.

The estimate (megacpm.train.memory, through megacpm.cli.model_summary as `megacpm info` prints it)
is compared with the measured CPU peak (tests/memory_probe.py: the profiler's allocation events) of
a forward and backward of the last pipeline chunk's head — the path training runs — on one
process and on two tensor-parallel gloo ranks, for settings where the vocabulary is chunked by the
kernels' default rule and where it is padded.
"""
import pytest
import torch

from megacpm.cli import model_summary
from megacpm.config import Config
from megacpm.model import count_parameters
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.sharded_model import ShardedModel
from tests.distributed import run_distributed
from tests.memory_probe import peak_bytes

pytestmark = pytest.mark.slow


def make_config(hidden, vocab, micro_batch, seq_len, tp):
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.intermediate_size, m.num_hidden_layers = hidden, 2 * hidden, 1
    m.num_attention_heads = m.num_key_value_heads = 2
    m.vocab_size, m.dim_model_base, m.max_position_embeddings = vocab, hidden // 2, seq_len
    cfg.train.micro_batch_size, cfg.train.global_batch_size, cfg.train.seq_len = micro_batch, micro_batch, seq_len
    cfg.train.device = "cpu"
    cfg.parallel.tp = tp
    return cfg


def estimated_loss_head(cfg, world_size):
    return model_summary(cfg, world_size)["memory_per_rank_bytes"]["loss_head"]


def measured_loss_head(cfg):
    """Peak bytes of the head's forward + backward beyond its inputs, on this rank."""
    ctx = ParallelContext.initialize(tp=cfg.parallel.tp, timeout_s=120)
    head = ShardedModel(cfg.model, ctx, generator=torch.Generator().manual_seed(0)).last_chunk
    g = torch.Generator().manual_seed(1)
    t = cfg.train
    hidden = torch.randn(t.micro_batch_size, t.seq_len, cfg.model.hidden_size, generator=g, requires_grad=True)
    labels = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len), generator=g)

    def train_head():
        head.head_loss(hidden, labels).backward()

    return peak_bytes(train_head)[1]


SETTINGS = [
    # (hidden, vocab, micro_batch, seq_len, tp)
    (32, 65536, 2, 1024, 1),  # logits-dominated: two chunks of 1024 tokens by the default rule
    (256, 8000, 1, 1024, 1),  # one chunk; the fp32 weight-gradient accumulator matters
    (32, 65537, 2, 1024, 2),  # vocab-parallel, padded to 32769 rows per rank, chunks of 2047 tokens
]


@pytest.mark.parametrize("hidden, vocab, micro_batch, seq_len, tp", SETTINGS,
                         ids=[f"v{s[1]}-tp{s[4]}" for s in SETTINGS])
def test_info_loss_head_matches_the_measured_peak(hidden, vocab, micro_batch, seq_len, tp):
    cfg = make_config(hidden, vocab, micro_batch, seq_len, tp)
    estimate = estimated_loss_head(cfg, tp)
    if tp == 1:
        measured = [measured_loss_head(cfg)]
    else:
        measured = run_distributed(measured_loss_head, tp, args=(cfg,))
    # The head is a small part of the model's memory here only because the model is tiny; the
    # figure must be the head's own, not a bound that hides an order of magnitude.
    assert estimate > 10 * count_parameters(cfg.model)["non_embedding"] * 4
    for peak in measured:
        assert peak == pytest.approx(estimate, rel=0.2), (peak, estimate)


def test_a_dpo_pair_counts_two_rows_and_live_adds_the_frozen_weights():
    from megacpm.train.memory import estimate_training_memory

    def estimate(kind, micro_batch, reference="precompute"):
        cfg = make_config(64, 512, micro_batch, 32, 1)
        cfg.train.global_batch_size = 4
        cfg.objective.kind, cfg.objective.reference = kind, reference
        return estimate_training_memory(cfg, 10_000, device_type="cpu")

    one_pair, two_rows = estimate("dpo", 1), estimate("lm", 2)
    assert one_pair["activations"] == two_rows["activations"] and one_pair["loss_head"] == two_rows["loss_head"]
    assert "reference" not in one_pair
    live = estimate("dpo", 1, "live")
    assert live["reference"] == live["weights"] and live["total"] == one_pair["total"] + live["weights"]


@pytest.mark.parametrize("cp_attention", ["ring", "all_gather"])
def test_context_parallel_ranks_keep_their_share_of_each_sequence(cp_attention):
    from megacpm.train.memory import estimate_training_memory

    def estimate(seq_len, cp=1, world=1):
        cfg = make_config(64, 512, 2, seq_len, 1)
        cfg.train.global_batch_size = 8
        cfg.parallel.cp, cfg.parallel.cp_attention, cfg.parallel.zero1 = cp, cp_attention, True
        return estimate_training_memory(cfg, 10_000, device_type="cpu", world_size=world), cfg

    (sharded, cfg), (short, _) = estimate(256, cp=4, world=4), estimate(64)
    # A cp rank holds a cp = 1 rank's activations at seq_len / cp, its loss head too ...
    gathered = 0
    if cp_attention == "all_gather":  # ... plus the K and V gathered from the other 3 ranks, every layer
        m = cfg.model
        gathered = m.num_hidden_layers * 2 * 64 * 2 * m.num_key_value_heads * m.head_dim * 4 * 3
    assert sharded["activations"] == short["activations"] + gathered
    assert sharded["loss_head"] == short["loss_head"]
    # ... and ZeRO-1 shards its optimizer state over dp x cp = 4 ranks.
    assert sharded["optimizer"] == short["optimizer"] // 4
