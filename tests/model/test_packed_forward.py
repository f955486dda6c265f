"""Packed rows: each sample gets the logits it gets alone (restarting positions, document mask)."""
import pytest
import torch

from megacpm.config import ModelConfig
from megacpm.model import MiniCPM
from megacpm.model.attention import document_boundaries, document_causal_mask


def _model(impl):
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=61, max_position_embeddings=64, attention_impl=impl)
    model = MiniCPM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_samples_match_each_sample_alone(impl):
    model = _model(impl)
    g = torch.Generator().manual_seed(1)
    lengths = [5, 7, 3]
    samples = [torch.randint(1, 61, (n,), generator=g) for n in lengths]
    row = torch.cat(samples)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    documents = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]
    with torch.no_grad():
        packed = model(row, positions, documents)[0]
        start = 0
        for sample in samples:
            alone = model(sample[None])[0]
            torch.testing.assert_close(packed[start:start + len(sample)], alone, rtol=1e-4, atol=5e-5)
            start += len(sample)
        # Without the mask and positions the later samples see the earlier ones: the test can fail.
        unmasked = model(row)[0]
    assert not torch.allclose(unmasked[lengths[0]:], packed[lengths[0]:], atol=1e-4)


def test_document_mask_and_boundaries():
    documents = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    mask = document_causal_mask(documents)[:, 0]
    expected = torch.zeros(2, 5, 5, dtype=torch.bool)
    for b in range(2):
        for i in range(5):
            for j in range(i + 1):
                expected[b, i, j] = bool(documents[b, i] == documents[b, j])
    assert torch.equal(mask, expected)
    cu_seqlens, longest = document_boundaries(documents)
    assert cu_seqlens.tolist() == [0, 2, 5, 6, 8, 10] and longest == 3
