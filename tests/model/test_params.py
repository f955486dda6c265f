"""Parameter counts against the MiniCPM paper's published non-embedding sizes."""
import pytest

import megacpm.model.params as params_module
from megacpm.config import ModelConfig, load_config
from megacpm.model import MiniCPM, count_parameters


@pytest.mark.parametrize("preset, non_embedding", [
    ("minicpm-1.2b", 1_247_442_432),
    ("minicpm-2.4b", 2_442_057_984),
    ("minicpm-2.4b-128k", 2_442_057_984),
])
def test_published_sizes(preset, non_embedding):
    cfg = load_config(preset).model
    counts = count_parameters(cfg)
    assert counts["non_embedding"] == non_embedding
    tables = 1 if cfg.tie_word_embeddings else 2
    assert counts["embedding"] == tables * cfg.vocab_size * cfg.hidden_size
    assert counts["total"] == non_embedding + tables * cfg.vocab_size * cfg.hidden_size


def test_matches_a_materialised_model_and_the_formula():
    cfg = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, tie_word_embeddings=False)
    counts = count_parameters(cfg)
    assert counts["total"] == sum(p.numel() for p in MiniCPM(cfg).parameters())
    d, kv = 64, 2 * 16
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * 96 + 2 * d
    assert counts["non_embedding"] == 3 * per_layer + d


def test_counts_on_the_meta_device(monkeypatch):
    # The 2.4B-128K model would need about 11 GB in fp32: counting must not allocate any of it.
    built = []

    class Recording(MiniCPM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(params_module, "MiniCPM", Recording)
    count_parameters(load_config("minicpm-2.4b-128k").model)
    assert len(built) == 1
    assert all(p.is_meta for p in built[0].parameters())
