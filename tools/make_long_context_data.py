#!/usr/bin/env python
"""Build the long-context miniature's data: documents that can only be predicted from far back.

  python tools/make_long_context_data.py [--out data/long-context-demo] [--words 512] \\
      [--short-words 24] [--long-words 100] [--short-docs 3000] [--mixture-docs 1500] \\
      [--long-share 0.44] [--seed 0]

A document is a passage of distinct pseudo-words drawn at random (its length drawn between half the
given number of words and all of it), a ``;``, the same passage again and a ``.``. The first half
cannot be predicted (the loss is about ln(words) per token); a model that uses its context copies
the second half from the first, and the distance it must look back is the passage length, so it
must find the earlier occurrence by its content. So the loss by position (train.eval_position_buckets, tools/eval_long_context.py)
shows directly which distances a model uses, and how far a context extension carries it:

* ``OUT/short.txt``: passages of up to --short-words (documents of at most 2 * 24 + 2 = 50 tokens,
  for a model trained at 64 tokens);
* ``OUT/mixture.txt``: the long-context branch's data mixture: short documents and documents with
  passages of up to --long-words (202 tokens, for 256), long ones --long-share of the tokens
  (MiniCPM-128K used 44% long documents);
* ``OUT/long.txt``: long documents only, held out from both (the evaluation's documents);
* ``OUT/tokenizer.json``: a word-level tokenizer, one token per pseudo-word and mark, and
  ``<|endoftext|>`` at id 0, so a passage of n words is n tokens.

Documents are separated by two blank lines (data.source text). Nothing is downloaded, and the same
arguments give byte-identical files. Files are written to temporary names and renamed.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _entry, when imported from its path

from _entry import OneLineParser, run_tool  # noqa: E402
from megacpm.data.tokenizer import EOD_TOKEN  # noqa: E402
from megacpm.io.atomic import write_text_atomic  # noqa: E402

PROG = "make_long_context_data"
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
MARKS = (";", ".")
DOCUMENT_BREAK = "\n\n\n"


class UsageError(Exception):
    pass


def pseudo_words(count: int, rng: random.Random) -> List[str]:
    """``count`` distinct pronounceable words of three consonant-vowel syllables."""
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    if count > len(syllables) ** 3:
        raise UsageError(f"--words {count}: at most {len(syllables) ** 3} pseudo-words")
    words: set = set()
    while len(words) < count:
        words.add("".join(rng.choice(syllables) for _ in range(3)))
    return sorted(words)


def document(words: List[str], passage_words: int, rng: random.Random) -> str:
    """A passage of passage_words / 2 .. passage_words distinct words, then again. The length varies
    so the copy must find the earlier occurrence by content, not by a fixed distance back."""
    passage = " ".join(rng.sample(words, rng.randint(max(1, passage_words // 2), passage_words)))
    return f"{passage} ; {passage} ."


def mean_tokens(passage_words: int) -> float:
    """A document's mean length in tokens: two passages of passage_words / 2 .. passage_words words
    on average, and the two marks."""
    low = max(1, passage_words // 2)
    return 2 * (low + passage_words) / 2 + 2


def documents_text(words, passage_words: int, count: int, rng: random.Random) -> List[str]:
    return [document(words, passage_words, rng) for _ in range(count)]


def word_level_tokenizer(words: List[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOD_TOKEN: 0, **{token: i + 1 for i, token in enumerate([*MARKS, *words])}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOD_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([EOD_TOKEN])
    return tokenizer


def build(out: Path, words: int, short_words: int, long_words: int, short_docs: int, mixture_docs: int,
          long_share: float, seed: int) -> dict:
    if not 1 <= short_words <= words or not 1 <= long_words <= words:
        raise UsageError(f"--short-words and --long-words must be in 1..--words {words} (a passage's words are distinct)")
    if not 0.0 < long_share < 1.0:
        raise UsageError(f"--long-share {long_share}: must be a fraction in (0, 1)")
    if min(short_docs, mixture_docs) < 2:
        raise UsageError("--short-docs and --mixture-docs must be at least 2 (one is held out for validation)")
    rng = random.Random(seed)
    vocabulary = pseudo_words(words, rng)
    short = documents_text(vocabulary, short_words, short_docs, rng)
    # The mixture: long documents carrying long_share of its tokens, short ones the rest, shuffled.
    long_tokens, short_tokens = mean_tokens(long_words), mean_tokens(short_words)
    n_long = max(1, round(mixture_docs * long_share * short_tokens
                          / (long_share * short_tokens + (1 - long_share) * long_tokens)))
    mixture = (documents_text(vocabulary, long_words, n_long, rng)
               + documents_text(vocabulary, short_words, mixture_docs - n_long, rng))
    rng.shuffle(mixture)
    held_out = documents_text(vocabulary, long_words, max(64, mixture_docs // 10), rng)
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("short.txt", short), ("mixture.txt", mixture), ("long.txt", held_out)):
        write_text_atomic(out / name, DOCUMENT_BREAK.join(docs) + "\n")
    tokenizer = word_level_tokenizer(vocabulary)
    write_text_atomic(out / "tokenizer.json", tokenizer.to_str())
    return {"vocab_size": tokenizer.get_vocab_size(), "short": len(short), "mixture": len(mixture),
            "mixture_long": n_long, "long_token_share": n_long * long_tokens
            / (n_long * long_tokens + (len(mixture) - n_long) * short_tokens), "held_out": len(held_out)}


def main(argv=None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--out", default="data/long-context-demo")
    parser.add_argument("--words", type=int, default=512, help="pseudo-words in the vocabulary")
    parser.add_argument("--short-words", type=int, default=24, help="words in a short document's passage")
    parser.add_argument("--long-words", type=int, default=100, help="words in a long document's passage")
    parser.add_argument("--short-docs", type=int, default=3000)
    parser.add_argument("--mixture-docs", type=int, default=1500)
    parser.add_argument("--long-share", type=float, default=0.44, help="the long documents' share of the mixture's tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def body() -> int:
        made = build(Path(args.out), args.words, args.short_words, args.long_words, args.short_docs,
                     args.mixture_docs, args.long_share, args.seed)
        print(f"wrote {args.out}: short.txt ({made['short']} documents), mixture.txt ({made['mixture']}, "
              f"{made['mixture_long']} long: {made['long_token_share']:.0%} of its tokens), long.txt "
              f"({made['held_out']}), tokenizer.json ({made['vocab_size']} tokens)")
        return 0

    return run_tool(PROG, body, {UsageError: 2})


if __name__ == "__main__":
    sys.exit(main())
