"""From a DataConfig to train/validation sample streams: corpus -> tokenizer -> tokens -> split.

The tokenized corpus is cached under ``<cache>/tokens/`` (uint16 when the vocabulary fits, else
int32; one flat token array plus document offsets), keyed by the corpus fingerprint and the exact
tokenizer, so a second build only stats the corpus files and loads two .npy files.

The validation split is a fixed, seed-independent choice of whole documents (see
validation_doc_ids): changing train.seed never moves a document between splits.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
from tokenizers import Tokenizer

from megacpm.config.schema import CHAT_SOURCES, DATA_SOURCES, DataConfig
from megacpm.data.batch import Batch
from megacpm.data.chat import ChatDataBundle, build_chat_datasets
from megacpm.data.cache import cache_key, resolve_cache_dir
from megacpm.data.corpus import Corpus, text_corpus
from megacpm.data.embedded import embedded_corpus
from megacpm.data.errors import DataError
from megacpm.io.errors import print_warning
from megacpm.data.blending import BlendedDataset
from megacpm.data.gpt_dataset import GPTSampleDataset, get_batch
from megacpm.data.splits import VALIDATION_SPLIT_SEED, held_out_doc_ids, validation_doc_ids  # noqa: F401 (re-exported)
from megacpm.data.indexed_dataset import (IndexedDataset, IndexedDatasetWriter, check_token_ids, dtype_for_vocab,
                                          index_path)
from megacpm.data.tokenizer import LoadedTokenizer, id_space_size, load_given_tokenizer, load_or_train_tokenizer


@dataclass
class DataBundle:
    train: GPTSampleDataset | BlendedDataset  # get_batch reads either
    valid: GPTSampleDataset | BlendedDataset
    test: GPTSampleDataset | BlendedDataset | None  # data.test_fraction > 0 only; never trained on
    tokenizer: Optional[Tokenizer]  # None for a pre-tokenized (Megatron) corpus
    eod_id: Optional[int]  # the end-of-document token appended to every document (None: the corpus has its own)
    tokenizer_vocab_size: int  # largest token id + 1; may be below model.vocab_size
    train_tokens: int  # tokens in each split's stream, end-of-document tokens included
    valid_tokens: int
    train_docs: int
    valid_docs: int
    document_mask_eod: Optional[int] = None  # data.document_mask: the token that ends a document

    def train_batch(self, start: int, count: int) -> Batch:
        """Stream positions start .. start + count - 1 of the train split."""
        return self._batch(self.train, start, count)

    def eval_batch(self, count: int) -> Batch:
        """The first ``count`` validation samples (the same under every layout and seed)."""
        return self._batch(self.valid, 0, count)

    def _batch(self, dataset, start: int, count: int) -> Batch:
        batch = Batch.from_tokens(get_batch(dataset, start, count))
        return batch if self.document_mask_eod is None else batch.with_document_mask(self.document_mask_eod)

    def describe(self) -> str:
        return (
            f"train {self.train_tokens:,} tokens / {self.train_docs} docs, "
            f"valid {self.valid_tokens:,} tokens / {self.valid_docs} docs, "
            f"tokenizer vocab {self.tokenizer_vocab_size}"
        )


def open_corpus(data_cfg: DataConfig) -> Corpus:
    if data_cfg.source == "embedded":
        return embedded_corpus(data_cfg.max_corpus_mb)
    if data_cfg.source == "text":
        if not data_cfg.path:
            raise DataError("data.path: required when data.source is 'text'")
        return text_corpus(data_cfg.path)
    raise DataError(f"data.source: {data_cfg.source!r} is not one of {', '.join(DATA_SOURCES)}")


def token_dtype(tokenizer: Tokenizer) -> np.dtype:
    return dtype_for_vocab(id_space_size(tokenizer))


def tokenize_documents(tokenizer: Tokenizer, documents: List[str], dtype: np.dtype) -> Tuple[np.ndarray, np.ndarray]:
    """(flat tokens, int64 offsets [num_docs + 1]). Encodes in parallel on all cores (Rust threads)."""
    # encode_batch_fast skips computing character offsets, which we never use (tokenizers >= 0.20).
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    encodings = encode_batch(documents, add_special_tokens=False)
    per_doc = [np.asarray(encoding.ids, dtype=dtype) for encoding in encodings]
    offsets = np.zeros(len(per_doc) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids in per_doc], out=offsets[1:])
    tokens = np.concatenate(per_doc) if per_doc else np.zeros(0, dtype=dtype)
    return tokens, offsets


def load_or_tokenize(
    corpus: Corpus, loaded: LoadedTokenizer, cache_dir: Path, read_documents: Callable[[], List[str]]
) -> Path:
    """The corpus as a Megatron indexed dataset with an end-of-document token after each document,
    built once and cached under ``<cache>/tokens/`` keyed by the corpus and the exact tokenizer: the
    prefix of its .bin/.idx. Every source then trains through the same (memory-mapped) path."""
    dtype = token_dtype(loaded.tokenizer)
    tokenizer_hash = hashlib.sha256(loaded.json_text.encode("utf-8")).hexdigest()
    key = cache_key(["indexed", corpus.fingerprint, tokenizer_hash, dtype.str, str(loaded.eod_id)])
    prefix = cache_dir / "tokens" / key
    if index_path(prefix).is_file():  # the writer renames the .idx last: present means complete
        return prefix
    tokens, offsets = tokenize_documents(loaded.tokenizer, read_documents(), dtype)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(prefix, vocab_size=id_space_size(loaded.tokenizer)) as writer:
        for start, end in zip(offsets[:-1], offsets[1:]):
            writer.add_sequences([np.append(tokens[start:end], np.asarray(loaded.eod_id, dtype=tokens.dtype))])
            writer.end_document()
    return prefix


def _indexed_splits(prefix: str, data_cfg: DataConfig, vocab_size: int, seq_len: int, seed: int,
                    description: Optional[str] = None):
    """(train, valid, test or None) sample streams of one Megatron indexed dataset, used in place."""
    corpus = IndexedDataset(prefix)
    tokens = corpus.tokens
    check_token_ids(tokens, vocab_size, f"{prefix}.bin")
    starts, lengths = corpus.document_spans()
    if len(starts) < 2:
        raise DataError(
            f"{description or prefix}: {len(starts)} document(s); need at least 2 (one is held out for "
            "validation). A text file's documents are separated by two or more blank lines"
        )
    valid_ids, test_ids = held_out_doc_ids(lengths, data_cfg.val_fraction, data_cfg.test_fraction)
    train_ids = np.setdiff1d(np.arange(len(starts)), np.concatenate([valid_ids, test_ids]))
    splits = []
    for split, doc_ids in (("train", train_ids), ("valid", valid_ids), ("test", test_ids)):
        if split == "test" and not len(doc_ids):
            splits.append(None)
            continue
        try:
            dataset = GPTSampleDataset.over_documents(tokens, starts[doc_ids], lengths[doc_ids],
                                                      seq_len=seq_len, seed=seed, split=split)
            splits.append(dataset.cache_indices_in(resolve_cache_dir(data_cfg.cache_dir) / "indices"))
        except ValueError as exc:
            raise DataError(f"data: the {split} split of {description or prefix} is too small ({exc}); "
                            "use more text or change data.val_fraction") from None
    return splits


def data_signature(data_cfg: DataConfig) -> str:
    """What defines the sample stream (not where caches live): a run whose data config changes
    (a branch with a new mixture) starts the new stream from its beginning."""
    defining = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k != "cache_dir"}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def megatron_datasets(data_cfg: DataConfig, vocab_size: int, seq_len: int, seed: int) -> DataBundle:
    """Sample streams over Megatron indexed datasets (tools/preprocess_data.py --append-eod), used in
    place (memory-mapped, split by documents, nothing copied): one prefix, or a weighted mixture whose
    train and validation streams are blended with the same weights."""
    mixture = data_cfg.mixture or {data_cfg.path: 1.0}
    parts = [_indexed_splits(prefix, data_cfg, vocab_size, seq_len, seed) for prefix in mixture]
    weights = list(mixture.values())
    train, valid, test = ([p[k] for p in parts] for k in (0, 1, 2))
    stream = (lambda datasets: datasets[0]) if len(parts) == 1 else (lambda datasets: BlendedDataset(datasets, weights))
    return DataBundle(train=stream(train), valid=stream(valid), test=None if test[0] is None else stream(test),
                      tokenizer=None, eod_id=None,
                      tokenizer_vocab_size=vocab_size, train_tokens=sum(d.num_tokens for d in train),
                      valid_tokens=sum(d.num_tokens for d in valid), train_docs=sum(d.num_docs for d in train),
                      valid_docs=sum(d.num_docs for d in valid))


def _tokenizer_for(data_cfg: DataConfig, corpus: Corpus, vocab_size: int, cache_dir: Path,
                   read_documents: Callable[[], List[str]]) -> LoadedTokenizer:
    if data_cfg.tokenizer:
        return load_given_tokenizer(data_cfg.tokenizer, vocab_size)
    return load_or_train_tokenizer(corpus, vocab_size, cache_dir, read_documents)


def build_datasets(data_cfg: DataConfig, vocab_size: int, seq_len: int, seed: int,
                   warn: Callable[[str], None] = print_warning) -> Union[DataBundle, ChatDataBundle]:
    """The train and validation sample streams of data_cfg for a model with vocab_size tokens.
    ``warn`` receives one line per data problem that does not stop the run (skipped chat lines)."""
    if data_cfg.source in CHAT_SOURCES:
        # Without data.tokenizer, chat text is tokenized as the embedded pretraining run's is (the
        # same cached tokenizer), so a tiny pretrained run can be fine-tuned as it is.
        corpus = embedded_corpus(data_cfg.max_corpus_mb)
        cache_dir = resolve_cache_dir(data_cfg.cache_dir)
        loaded = _tokenizer_for(data_cfg, corpus, vocab_size, cache_dir, corpus.read_documents)
        return build_chat_datasets(data_cfg, loaded, seq_len, seed, warn)
    bundle = _pretraining_datasets(data_cfg, vocab_size, seq_len, seed)
    if data_cfg.document_mask:
        eod_id = bundle.eod_id
        if eod_id is None:
            if not data_cfg.tokenizer:
                raise DataError("data.document_mask: needs the end-of-document token of this megatron corpus; "
                                "set data.tokenizer to the tokenizer it was made with")
            eod_id = load_given_tokenizer(data_cfg.tokenizer, vocab_size).eod_id
        bundle = dataclasses.replace(bundle, document_mask_eod=eod_id)
    return bundle


def _pretraining_datasets(data_cfg: DataConfig, vocab_size: int, seq_len: int, seed: int) -> DataBundle:
    if data_cfg.source == "megatron":
        return megatron_datasets(data_cfg, vocab_size, seq_len, seed)
    corpus = open_corpus(data_cfg)
    cache_dir = resolve_cache_dir(data_cfg.cache_dir)
    # Read at most once, and only when the tokenizer or the tokens are not cached.
    read_documents = functools.lru_cache(maxsize=1)(corpus.read_documents)
    loaded = _tokenizer_for(data_cfg, corpus, vocab_size, cache_dir, read_documents)
    prefix = load_or_tokenize(corpus, loaded, cache_dir, read_documents)
    train, valid, test = _indexed_splits(str(prefix), data_cfg, vocab_size, seq_len, seed,
                                         description=corpus.description)
    return DataBundle(train=train, valid=valid, test=test, tokenizer=loaded.tokenizer, eod_id=loaded.eod_id,
                      tokenizer_vocab_size=id_space_size(loaded.tokenizer), train_tokens=train.num_tokens,
                      valid_tokens=valid.num_tokens, train_docs=train.num_docs, valid_docs=valid.num_docs)
