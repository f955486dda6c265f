"""The tokenizer: a given tokenizers JSON (data.tokenizer), or a byte-level BPE trained on the corpus.

A trained tokenizer is GPT-2 style byte-level BPE (any UTF-8 text round-trips, nothing is ever
unknown) with one special token, ``<|endoftext|>``, at id ``EOD_ID`` = 0: the end-of-document
separator appended to every document. Training is cached under ``<cache>/tokenizers/``, keyed by
the corpus fingerprint (file list and sizes), the vocabulary size and the tokenizers version.

A given tokenizer must have an end-of-document token: ``<|endoftext|>``, else ``</s>`` or
``<eos>`` (the first one found is used).

Note: the literal text ``<|endoftext|>`` inside a document encodes as the separator itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megacpm.data.cache import cache_key, write_text_atomic
from megacpm.data.corpus import Corpus
from megacpm.data.errors import DataError

EOD_TOKEN = "<|endoftext|>"
EOD_ID = 0  # trained tokenizers: the first special token gets the first id
EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<eos>")

BYTE_ALPHABET_SIZE = 256
MIN_TRAINED_VOCAB = BYTE_ALPHABET_SIZE + 1  # every byte plus the end-of-document token


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: Tokenizer
    eod_id: int
    json_text: str  # the serialised tokenizer: its hash keys the tokenized-corpus cache


def new_byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_byte_level_bpe(documents: List[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with at most vocab_size tokens (fewer if merges run out)."""
    if vocab_size < MIN_TRAINED_VOCAB:
        raise DataError(
            f"model.vocab_size {vocab_size} is too small to train a byte-level tokenizer "
            f"(needs at least {MIN_TRAINED_VOCAB}); set data.tokenizer to use your own"
        )
    tokenizer = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    assert tokenizer.token_to_id(EOD_TOKEN) == EOD_ID
    return tokenizer


def id_space_size(tokenizer: Tokenizer) -> int:
    """Largest token id + 1: what must fit the embedding table (and the token dtype).

    It equals the token count unless a given tokenizer file leaves holes in its ids.
    """
    return max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def find_eod_id(tokenizer: Tokenizer, source: str) -> int:
    for token in EOD_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataError(f"{source} has no end-of-document token (looked for {', '.join(EOD_CANDIDATES)})")


def load_given_tokenizer(path: str, vocab_size: int) -> LoadedTokenizer:
    """data.tokenizer: a tokenizers JSON whose vocabulary fits model.vocab_size."""
    file = Path(path).expanduser()
    try:
        json_text = file.read_text(encoding="utf-8")
        tokenizer = Tokenizer.from_str(json_text)
    except OSError as err:
        raise DataError(f"data.tokenizer: cannot read {file}: {err.strerror or err}") from None
    except Exception as err:  # tokenizers raises plain Exception for malformed JSON
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"data.tokenizer: {file} is not a tokenizers JSON file ({reason})") from None
    size = id_space_size(tokenizer)
    if size > vocab_size:
        raise DataError(f"data.tokenizer: {file} has {size} token ids, more than model.vocab_size {vocab_size}")
    return LoadedTokenizer(tokenizer, find_eod_id(tokenizer, f"data.tokenizer: {file}"), json_text)


def trained_tokenizer_path(cache_dir: Path, corpus: Corpus, vocab_size: int) -> Path:
    key = cache_key(["byte-level-bpe", corpus.fingerprint, str(vocab_size), tokenizers.__version__])
    return cache_dir / "tokenizers" / f"bpe-{vocab_size}-{key}.json"


def load_or_train_tokenizer(
    corpus: Corpus, vocab_size: int, cache_dir: Path, read_documents: Callable[[], List[str]]
) -> LoadedTokenizer:
    """The cached tokenizer for (corpus, vocab_size), training and caching it if there is none.

    ``read_documents``: the corpus' documents (called only to train).
    """
    path = trained_tokenizer_path(cache_dir, corpus, vocab_size)
    if path.is_file():
        json_text = path.read_text(encoding="utf-8")
        return LoadedTokenizer(Tokenizer.from_str(json_text), EOD_ID, json_text)
    tokenizer = train_byte_level_bpe(read_documents(), vocab_size)
    json_text = tokenizer.to_str()
    write_text_atomic(path, json_text)
    return LoadedTokenizer(tokenizer, EOD_ID, json_text)
