#!/usr/bin/env python
"""Tokenize text files into a Megatron-LM indexed dataset: PREFIX.bin and PREFIX.idx.

  python tools/preprocess_data.py --input corpus.jsonl notes.txt --output-prefix data/corpus \\
      --tokenizer tokenizer.json [--json-key text] [--workers 8] [--append-eod] [--eod-id N]

The output has the format of Megatron-LM's own preprocess_data.py (MMIDIDX version 1, one sequence
per document, token dtype uint16 when the tokenizer's ids fit, else int32), so it trains in either
engine; megacpm.data.IndexedDataset(PREFIX) reads it. (Megatron's tool names its files
PREFIX_text_document.bin/.idx; this one writes exactly PREFIX.bin and PREFIX.idx.)

Inputs, read in the order given:
* ``*.jsonl`` or ``*.json``: one JSON object per line, the document's text under --json-key.
  Unusable lines (not UTF-8, not JSON, not an object, the key missing, a non-string or empty text)
  are skipped, counted and reported at the end with the first one's file and line; blank lines are
  ignored. The run fails only if no document at all is usable.
* anything else: UTF-8 plain text, documents separated by two or more blank lines (one blank line is
  a paragraph break inside a document), the rule of ``data.source: text``. Such a file is read whole;
  use jsonl for corpora larger than memory (it is streamed line by line).

Tokenizer: a Hugging Face ``tokenizers`` JSON file, or a SentencePiece ``*.model`` (needs the
sentencepiece package). Documents are encoded without special tokens (no BOS). --append-eod adds
the end-of-document token after each document: --eod-id if given, else the tokenizer's
``<|endoftext|>``, ``</s>`` or ``<eos>``.

Why it is built this way: --workers N tokenizes in N processes (Pool.imap over chunks of documents;
each process encodes one document at a time, on one core, so N alone sets the parallelism), and the
parent writes the results in input order, so the output bytes do not depend on N. The writer
streams tokens to a temporary file and renames both files into place at the end: a failed or
interrupted run (Ctrl-C, SIGTERM) leaves nothing behind: the temporaries are removed and the tool
says ``preprocess_data: error: interrupted; no output written``. An existing PREFIX.bin/.idx is
replaced atomically, and only when the new one is complete (a failed run keeps the old one).

Exit status: 0 done; 1 no usable document, an unreadable input or a write error; 2 bad arguments;
130 Ctrl-C, 143 SIGTERM.
Errors are one line: ``preprocess_data: error: ...``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _entry, when imported from its path

import numpy as np  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from _entry import OneLineParser, run_tool  # noqa: E402

from megacpm.data import DataError, IndexedDatasetWriter  # noqa: E402
from megacpm.data.corpus import read_utf8, split_documents  # noqa: E402
from megacpm.data.tokenizer import EOD_CANDIDATES, id_space_size  # noqa: E402

PROG = "preprocess_data"
JSONL_SUFFIXES = (".jsonl", ".json")
SENTENCEPIECE_SUFFIX = ".model"
CHUNKSIZE = 32  # documents per worker task: amortises the pickling, still balances the workers


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2, nothing written."""


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- tokenizers ------------------------------------------------------------------------------------


class HFTokenizer:
    """A Hugging Face tokenizers JSON file."""

    def __init__(self, path: Path) -> None:
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises plain Exception for malformed files
            raise UsageError(f"--tokenizer: {path} is not a tokenizers JSON file ({first_line(err)})") from None
        # encode_batch_fast skips the character offsets we never use (tokenizers >= 0.20).
        self._encode_batch = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        self.vocab_size = id_space_size(self._tokenizer)

    def token_id(self, token: str) -> Optional[int]:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str) -> List[int]:
        return self._encode_batch([text], add_special_tokens=False)[0].ids


class SentencePieceTokenizer:
    """A SentencePiece model; the package is imported only when one is given."""

    def __init__(self, path: Path) -> None:
        try:
            import sentencepiece
        except ImportError:
            raise UsageError(
                f"--tokenizer: {path} is a SentencePiece model and the sentencepiece package is not "
                "installed (pip install sentencepiece)"
            ) from None
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as err:
            raise UsageError(f"--tokenizer: {path} is not a SentencePiece model ({first_line(err)})") from None
        self.vocab_size = self._processor.get_piece_size()

    def token_id(self, token: str) -> Optional[int]:
        token_id = self._processor.piece_to_id(token)  # the unknown token's id when absent
        return token_id if self._processor.id_to_piece(token_id) == token else None

    def encode(self, text: str) -> List[int]:
        return self._processor.encode(text)


def load_tokenizer(path: Path):
    kind = SentencePieceTokenizer if path.suffix == SENTENCEPIECE_SUFFIX else HFTokenizer
    return kind(path)


def resolve_eod_id(tokenizer, path: Path, eod_id: Optional[int], needed: bool) -> Optional[int]:
    """--eod-id if given, else the tokenizer's end-of-document token; None if neither (and not needed)."""
    if eod_id is not None:
        return eod_id
    for token in EOD_CANDIDATES:
        found = tokenizer.token_id(token)
        if found is not None:
            return found
    if needed:
        raise UsageError(
            f"--append-eod: {path} has no end-of-document token (looked for {', '.join(EOD_CANDIDATES)}); "
            "give one with --eod-id"
        )
    return None


# --- documents -------------------------------------------------------------------------------------


@dataclass
class SkippedLines:
    count: int = 0
    first: str = ""  # "FILE:LINE: reason" of the first one

    def add(self, where: str, reason: str) -> None:
        if self.count == 0:
            self.first = f"{where}: {reason}"
        self.count += 1

    def report(self) -> str:
        lines = "line" if self.count == 1 else "lines"
        return f"skipped {self.count} malformed {lines} (first: {self.first})"


def text_of_json_line(raw: bytes, key: str) -> str:
    """The document in one jsonl line; ValueError(reason) when the line is unusable."""
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"bad JSON ({err.msg}: column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    if key not in record:
        raise ValueError(f"no {key!r} key")
    text = record[key]
    if not isinstance(text, str):
        raise ValueError(f"{key!r} is a JSON {type(text).__name__}, not a string")
    if not text.strip():
        raise ValueError(f"{key!r} is empty")
    return text


def jsonl_documents(path: Path, key: str, skipped: SkippedLines) -> Iterator[str]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield text_of_json_line(raw, key)
            except ValueError as reason:
                skipped.add(f"{path}:{number}", str(reason))


def documents_of(paths: Iterable[Path], key: str, skipped: SkippedLines) -> Iterator[str]:
    for path in paths:
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from jsonl_documents(path, key, skipped)
        else:
            yield from split_documents(read_utf8(path, "--input"))


# --- tokenizing in worker processes ----------------------------------------------------------------

_worker_state = None  # (tokenizer, eod_id or None, dtype), set in each worker by init_worker


def init_worker(tokenizer_path: str, eod_id: Optional[int], dtype: str) -> None:
    global _worker_state
    _worker_state = (load_tokenizer(Path(tokenizer_path)), eod_id, np.dtype(dtype))


def encode_document(text: str) -> np.ndarray:
    tokenizer, eod_id, dtype = _worker_state
    ids = tokenizer.encode(text)
    if eod_id is not None:
        ids.append(eod_id)
    return np.asarray(ids, dtype=dtype)


def init_pool_worker(*worker_args) -> None:
    # Ctrl-C and SIGTERM are the parent's to handle (it stops the pool and discards the output): no
    # traceback per worker. The pool's own terminate() then ends a worker with SIGTERM's default.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    init_worker(*worker_args)


def encoded_documents(documents: Iterable[str], workers: int, worker_args: tuple) -> Iterator[np.ndarray]:
    """Token arrays of the documents in input order, from `workers` processes (1: this one).

    Pool.imap hands out chunks as workers free up and reads its input only a pipe's worth ahead,
    so memory stays bounded however large the corpus.
    """
    if workers == 1:
        init_worker(*worker_args)
        yield from map(encode_document, documents)
        return
    with multiprocessing.Pool(workers, initializer=init_pool_worker, initargs=worker_args) as pool:
        yield from pool.imap(encode_document, documents, chunksize=CHUNKSIZE)


def progress(items: Iterable, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm  # local: only with a progress bar

    return tqdm(items, unit=" docs", dynamic_ncols=True)


# --- command line ----------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description="Tokenize jsonl / text files into PREFIX.bin and PREFIX.idx "
                           "(Megatron-LM's indexed dataset).")
    parser.add_argument("--input", nargs="+", required=True, type=Path, metavar="FILE",
                        help="*.jsonl / *.json (one object per line) or plain text (documents separated by "
                             "two or more blank lines)")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", required=True, type=Path, metavar="PATH",
                        help="a tokenizers JSON file or a SentencePiece *.model")
    parser.add_argument("--json-key", default="text", help="the key holding the text in jsonl (default: text)")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizing processes (default: 1)")
    parser.add_argument("--append-eod", action="store_true", help="add the end-of-document token after each document")
    parser.add_argument("--eod-id", type=int, default=None, metavar="N",
                        help="the end-of-document id (default: the tokenizer's <|endoftext|>, </s> or <eos>)")
    return parser.parse_args(argv)


def check_file(option: str, path: Path) -> None:
    if not path.is_file():
        raise UsageError(f"{option}: {path} {'is not a file' if path.exists() else 'does not exist'}")


def check_args(args: argparse.Namespace) -> None:
    for path in args.input:
        check_file("--input", path)
    check_file("--tokenizer", args.tokenizer)
    output_dir = Path(args.output_prefix).parent
    ancestor = output_dir
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if os.path.lexists(ancestor) and not ancestor.is_dir():
        raise UsageError(f"--output-prefix: {ancestor} is a file, not a directory")
    if not output_dir.is_dir():
        raise UsageError(f"--output-prefix: directory {output_dir} does not exist")
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise UsageError(f"--output-prefix: directory {output_dir} is not writable")
    for path in (Path(f"{args.output_prefix}.bin"), Path(f"{args.output_prefix}.idx")):
        if path.is_dir():
            raise UsageError(f"--output-prefix: {path} is a directory")
    if args.workers < 1:
        raise UsageError(f"--workers: must be >= 1, got {args.workers}")
    if args.eod_id is not None and args.eod_id < 0:
        raise UsageError(f"--eod-id: must be >= 0, got {args.eod_id}")


def preprocess(args: argparse.Namespace) -> str:
    """Write the dataset; returns the summary line."""
    tokenizer = load_tokenizer(args.tokenizer)
    eod_id = resolve_eod_id(tokenizer, args.tokenizer, args.eod_id, needed=args.append_eod)
    eod_appended = eod_id if args.append_eod else None
    vocab_size = max(tokenizer.vocab_size, (eod_id or 0) + 1)
    skipped = SkippedLines()
    with IndexedDatasetWriter(args.output_prefix, vocab_size) as writer:
        start = time.perf_counter()
        worker_args = (str(args.tokenizer), eod_appended, writer.dtype.str)
        documents = documents_of(args.input, args.json_key, skipped)
        encoded = encoded_documents(documents, args.workers, worker_args)
        tokens = 0
        for ids in progress(encoded, enabled=sys.stderr.isatty()):
            writer.add_document(ids)
            tokens += len(ids)
        if writer.num_documents == 0:
            detail = f"; {skipped.report()}" if skipped.count else ""
            raise DataError(f"no usable document in {', '.join(map(str, args.input))}{detail}")
    seconds = time.perf_counter() - start
    if skipped.count:
        print(f"{PROG}: {skipped.report()}", file=sys.stderr)
    return (
        f"{args.output_prefix}.bin/.idx: {writer.num_documents:,} documents, {tokens:,} tokens, "
        f"{seconds:.2f} s, {tokens / max(seconds, 1e-9):,.0f} tokens/s "
        f"({args.workers} worker{'s' if args.workers != 1 else ''}, {writer.dtype})"
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    def body() -> int:
        check_args(args)
        print(preprocess(args))
        return 0

    # OSError: a write failed (disk full, permissions), as `PATH: cause`. SIGTERM, like Ctrl-C,
    # unwinds through the writer, which removes its temporaries: no output.
    return run_tool(PROG, body, {UsageError: 2, DataError: 1}, interrupted="interrupted; no output written",
                    sigterm=True)


if __name__ == "__main__":
    sys.exit(main())
