"""The embedded corpus, the tokenizer and build_datasets (small corpus and vocabulary)."""
import dataclasses

import numpy as np
import pytest

from megacpm.config.schema import DataConfig
from megacpm.data import DataError, build_datasets, build as build_module, tokenizer as tokenizer_module
from megacpm.data.build import validation_doc_ids
from megacpm.data.embedded import EXCLUDED_DIRS, select_files, stdlib_root

CORPUS_MB = 0.3
VOCAB = 512
SEQ_LEN = 64


def small_config(cache_dir, **overrides):
    return DataConfig(cache_dir=str(cache_dir), max_corpus_mb=CORPUS_MB, val_fraction=0.1, **overrides)


@pytest.fixture(scope="module")
def bundle(data_cache):
    return build_datasets(small_config(data_cache), vocab_size=VOCAB, seq_len=SEQ_LEN, seed=1)


def documents_of(ds):
    return {ds.tokens[s : s + n].tobytes() for s, n in zip(ds.doc_starts, ds.doc_lengths)}


def test_selection_is_deterministic_capped_and_spread():
    files = select_files(CORPUS_MB)
    assert files == select_files(CORPUS_MB)
    assert sum(f.stat().st_size for f in files) <= CORPUS_MB * 1024 * 1024
    relative = [f.relative_to(stdlib_root()) for f in files]
    assert not any(set(r.parts[:-1]) & EXCLUDED_DIRS for r in relative)
    assert len({r.parts[0] for r in relative}) >= 5  # many modules, not one package
    default = [f.relative_to(stdlib_root()).as_posix() for f in select_files(8.0)]
    assert "pydoc_data/topics.py" in default and len(default) > 100


def test_tokenizer_round_trips_text(bundle):
    tokenizer = bundle.tokenizer
    assert bundle.tokenizer_vocab_size <= VOCAB
    assert tokenizer.token_to_id("<|endoftext|>") == bundle.eod_id == 0
    for text in ["def f(x):\n    return x ** 2  # square\n", "Ünïcödé ✓ 日本語\t\r\n", ""]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_splits_are_disjoint_by_documents(bundle):
    train_docs, valid_docs = documents_of(bundle.train), documents_of(bundle.valid)
    assert not train_docs & valid_docs
    assert bundle.valid_docs >= 1 and bundle.train_docs > bundle.valid_docs
    assert bundle.train_tokens == bundle.train.num_tokens
    assert bundle.train[0].shape == (SEQ_LEN + 1,)
    assert bundle.train[0].max() < VOCAB


def test_validation_split_ignores_training_seed(bundle, data_cache):
    other = build_datasets(small_config(data_cache), vocab_size=VOCAB, seq_len=SEQ_LEN, seed=99)
    assert documents_of(other.valid) == documents_of(bundle.valid)
    assert any(not np.array_equal(other.train[i], bundle.train[i]) for i in range(10))


def test_validation_doc_ids_are_fixed_and_skip_oversized_documents():
    lengths = np.full(200, 100)
    lengths[17] = 50_000  # one document larger than the whole 2% share
    held_out = validation_doc_ids(lengths, 0.02)
    np.testing.assert_array_equal(held_out, validation_doc_ids(lengths.copy(), 0.02))
    assert len(held_out) == 4 and 17 not in held_out
    assert len(validation_doc_ids(lengths, 0.0)) == 1  # at least one document
    # Too few other documents: the oversized ones are held out after all.
    assert len(validation_doc_ids(np.array([5_000, 6_000, 7_000]), 0.5)) == 2
    with pytest.raises(DataError, match=r"data\.val_fraction"):
        validation_doc_ids(lengths, 1.0)


def test_cache_is_reused(bundle, data_cache, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(tokenizer_module, "train_byte_level_bpe", fail)
    monkeypatch.setattr(build_module, "tokenize_documents", fail)
    again = build_datasets(small_config(data_cache), vocab_size=VOCAB, seq_len=SEQ_LEN, seed=1)
    np.testing.assert_array_equal(again.train.tokens, bundle.train.tokens)
    np.testing.assert_array_equal(again.train[123], bundle.train[123])
    assert (data_cache / "tokens").is_dir() and not list(data_cache.rglob(".tmp-*"))


def test_given_tokenizer_too_large_for_vocab(bundle, tmp_path):
    path = tmp_path / "tok.json"
    bundle.tokenizer.save(str(path))
    config = small_config(tmp_path / "cache", tokenizer=str(path))
    # A ValueError as well, for callers that only know the builtin types.
    with pytest.raises(ValueError, match=r"data\.tokenizer: .* more than model\.vocab_size 300"):
        build_datasets(config, vocab_size=300, seq_len=SEQ_LEN, seed=1)
    # The same file within the vocabulary is used as is.
    given = build_datasets(config, vocab_size=VOCAB, seq_len=SEQ_LEN, seed=1)
    assert given.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()


def test_split_shorter_than_a_sample_is_a_data_error(data_cache):
    with pytest.raises(DataError, match=r"train\.seq_len"):
        build_datasets(small_config(data_cache), vocab_size=VOCAB, seq_len=10**7, seed=1)


def test_bad_config_values_are_data_errors(tmp_path):
    with pytest.raises(DataError, match=r"data\.source"):
        build_datasets(dataclasses.replace(small_config(tmp_path), source="web"), VOCAB, SEQ_LEN, 1)
    with pytest.raises(DataError, match=r"model\.vocab_size"):
        build_datasets(small_config(tmp_path), vocab_size=100, seq_len=SEQ_LEN, seed=1)
