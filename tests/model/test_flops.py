"""FLOPs per token (PaLM convention) against a hand computation."""
from megacpm.config import ModelConfig
from megacpm.train.flops import flops_per_token


def test_flops_per_token_by_hand():
    # d 64, 4 heads of 16, 2 kv heads, ff 96, 2 layers, vocab 100, seq 32.
    cfg = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    q_o = 2 * 64 * 64
    k_v = 2 * 64 * 32
    mlp = 3 * 64 * 96
    n_matmul = 2 * (q_o + k_v + mlp) + 100 * 64  # LM head counted, embedding lookup not
    training = 6 * n_matmul + 12 * 2 * 4 * 16 * 32
    flops = flops_per_token(cfg, 32)
    assert flops["training"] == training
    assert flops["forward"] == training / 3


def test_tying_does_not_change_flops():
    tied = ModelConfig(tie_word_embeddings=True)
    untied = ModelConfig(tie_word_embeddings=False)
    assert flops_per_token(tied, 128) == flops_per_token(untied, 128)
