"""Chat data for SFT and DPO: jsonl conversations -> token ids with a loss mask -> batches.

Input (``data.path``: a .jsonl file, a directory of them, or a list of either), one sample a line:
- ``data.source: sft``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``
  or ``{"prompt": "...", "response": "..."}``;
- ``data.source: preference``: ``{"prompt": ..., "chosen": ..., "rejected": ...}``, each value a
  string or a list of messages (a string prompt is a user turn, a string completion an assistant
  turn). A pair becomes two sequences, prompt + chosen and prompt + rejected.

Each sample is rendered by the chat template (megacpm.data.chat_template), tokenized segment by
segment, and aligned once: a sequence of L tokens gives L - 1 inputs, ``labels[t]`` its token
t + 1 where that token is learned, else IGNORE_INDEX. A sequence longer than ``train.seq_len`` + 1
tokens is dropped or cut (``data.too_long``). Lines that cannot be used (malformed JSON, not a chat
sample, an unknown role, an empty completion, too long) are counted and reported per file with
their line numbers, one warning line each; a file with no usable line is a DataError.

The tokenized samples are cached under ``<cache>/chat/``, keyed by the files' bytes, the exact
tokenizer, the template, the sequence length and the too-long policy.

Samples are split into train / validation (/ test) by the same fixed, seed-independent choice as
pretraining documents (megacpm.data.splits). A ``ChatDataset`` serves a split as a stream: position
p of the stream is unit ``order(p // n)[p % n]``, a seeded permutation per epoch, so the order is a
pure function of (seed, position) and a resumed run continues it exactly. A unit is one sample
(its ``rows_per_sample`` rows, padded to seq_len; a pair's rows adjacent, chosen first) or, with
``data.packing``, one packed row: samples placed next-fit in a seeded order, positions restarting
at each, one document id per sample (attention never crosses samples), the tail padding its own
document. ``Batch.extras["sample_index"]`` names each row's unit.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tokenizers import Tokenizer

from megacpm.config.schema import DataConfig
from megacpm.data.batch import IGNORE_INDEX, Batch
from megacpm.data.cache import cache_key, resolve_cache_dir, write_text_atomic
from megacpm.data.chat_template import EOD, ROLES, ChatTemplate, Message, resolve_template
from megacpm.data.errors import DataError
from megacpm.data.splits import held_out_doc_ids
from megacpm.data.tokenizer import LoadedTokenizer, id_space_size
from megacpm.io import atomic

SAMPLE_INDEX = "sample_index"  # Batch.extras key: int64 [rows], the stream unit each row belongs to
CHAT_CACHE_VERSION = "1"
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}  # seeds each split's own stream
PACKING_STREAM = 1 << 20  # the packing order's seed word: apart from every epoch's (0, 1, 2, ...)
PROBLEMS = ("malformed JSON", "not a chat sample", "unknown role", "empty completion", "too long")
LISTED_LINES = 8  # line numbers named per problem in a warning


# -- files -------------------------------------------------------------------------------------
def chat_files(path) -> List[Path]:
    """data.path's jsonl files, in order: a file, a directory's *.jsonl (sorted), or a list of either."""
    paths = path if isinstance(path, list) else [path]
    if not paths or any(not p for p in paths):
        raise DataError("data.path: required for a chat data.source (a .jsonl file, a directory or a list)")
    files: List[Path] = []
    for entry in paths:
        p = Path(entry).expanduser()
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise DataError(f"data.path: {p} has no .jsonl file")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"data.path: {p} does not exist")
    return files


# -- one line -> conversations ----------------------------------------------------------------
class _Unusable(Exception):
    """A line that cannot be a sample; ``args[0]`` is one of PROBLEMS."""


def _messages(value, completion: bool) -> List[Message]:
    """A string (a user turn, or an assistant turn for a completion) or a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant" if completion else "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _Unusable("not a chat sample")
    messages = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise _Unusable("not a chat sample")
        if message["role"] not in ROLES:
            raise _Unusable("unknown role")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _check_completion(messages: List[Message]) -> None:
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers or any(not m["content"].strip() for m in answers):
        raise _Unusable("empty completion")


def parse_line(text: str, source: str) -> List[List[Message]]:
    """The conversations of one jsonl line: [conversation] for sft, [chosen, rejected] for preference."""
    try:
        record = json.loads(text)
    except ValueError:
        raise _Unusable("malformed JSON") from None
    if not isinstance(record, dict):
        raise _Unusable("not a chat sample")
    if source == "sft":
        if "messages" in record:
            conversation = _messages(record["messages"], completion=False)
        elif isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
            conversation = [{"role": "user", "content": record["prompt"]},
                            {"role": "assistant", "content": record["response"]}]
        else:
            raise _Unusable("not a chat sample")
        _check_completion(conversation)
        return [conversation]
    if not all(key in record for key in ("prompt", "chosen", "rejected")):
        raise _Unusable("not a chat sample")
    prompt = _messages(record["prompt"], completion=False)
    pair = []
    for key in ("chosen", "rejected"):
        completion = _messages(record[key], completion=True)
        _check_completion(completion)
        pair.append(prompt + completion)
    return pair


# -- conversations -> token ids ---------------------------------------------------------------
def encode(tokenizer: Tokenizer, eod_id: int, template: ChatTemplate, conversation: Sequence[Message]
           ) -> Tuple[np.ndarray, np.ndarray]:
    """(int32 token ids, bool learned) of a conversation, tokenized segment by segment without the
    tokenizer's own special tokens. The template's BOS is a token name: its id when the tokenizer
    has that token, else left out (a byte-level tokenizer would spell it as text)."""
    ids: List[int] = []
    learned: List[bool] = []
    for position, (text, trained) in enumerate(template.segments(conversation)):
        if text is EOD:
            piece = [eod_id]
        elif position == 0 and text == template.bos:
            token = tokenizer.token_to_id(text)
            piece = [] if token is None else [token]
        else:
            piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids.extend(piece)
        learned.extend([trained] * len(piece))
    return np.asarray(ids, dtype=np.int32), np.asarray(learned, dtype=bool)


def fit_length(ids: np.ndarray, learned: np.ndarray, seq_len: int, too_long: str
               ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The sequence if it fits seq_len inputs (seq_len + 1 tokens), cut to fit under "truncate",
    None when dropped (too long under "drop", or cut until nothing learned is left)."""
    if len(ids) <= seq_len + 1:
        return ids, learned
    if too_long == "drop":
        return None
    ids, learned = ids[:seq_len + 1], learned[:seq_len + 1]
    return (ids, learned) if learned[1:].any() else None


# -- the tokenized samples of all files -------------------------------------------------------
@dataclass
class ChatSequences:
    """Every usable sample's sequences, flat: sequence s is tokens[offsets[s]:offsets[s + 1]];
    sample i owns sequences i * rows_per_sample .. (i + 1) * rows_per_sample - 1."""

    tokens: np.ndarray  # int32
    learned: np.ndarray  # bool, per token: is it a target
    offsets: np.ndarray  # int64 [num_sequences + 1]
    rows_per_sample: int
    report: Dict[str, Dict[str, List[int]]] = field(default_factory=dict)  # file -> problem -> line numbers

    @property
    def num_samples(self) -> int:
        return (len(self.offsets) - 1) // self.rows_per_sample

    def sequence(self, s: int) -> Tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[s], self.offsets[s + 1]
        return self.tokens[start:end], self.learned[start:end]

    def sample_lengths(self) -> np.ndarray:
        """Tokens per sample (all its sequences): the split's weights."""
        per_sequence = np.diff(self.offsets)
        return per_sequence.reshape(-1, self.rows_per_sample).sum(axis=1)


def tokenize_files(files: Sequence[Path], source: str, loaded: LoadedTokenizer, template: ChatTemplate,
                   seq_len: int, too_long: str) -> ChatSequences:
    rows_per_sample = 2 if source == "preference" else 1
    pieces_ids: List[np.ndarray] = []
    pieces_learned: List[np.ndarray] = []
    report: Dict[str, Dict[str, List[int]]] = {}
    for file in files:
        problems: Dict[str, List[int]] = {}
        usable = 0
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise DataError(f"data.path: {file}: not UTF-8 text (byte {err.start})") from None
        except OSError as err:
            raise DataError(f"data.path: cannot read {file}: {err.strerror or err}") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                conversations = parse_line(line, source)
                sequences = []
                for conversation in conversations:
                    ids, learned = encode(loaded.tokenizer, loaded.eod_id, template, conversation)
                    if not learned[1:].any():  # the template rendered nothing to learn
                        raise _Unusable("empty completion")
                    fitted = fit_length(ids, learned, seq_len, too_long)
                    if fitted is None:
                        raise _Unusable("too long")
                    if len(fitted[0]) < len(ids):
                        problems.setdefault("truncated", []).append(number)
                    sequences.append(fitted)
            except _Unusable as why:
                problems.setdefault(why.args[0], []).append(number)
                continue
            usable += 1
            for ids, learned in sequences:
                pieces_ids.append(ids)
                pieces_learned.append(learned)
        report[str(file)] = problems
        if not usable:
            raise DataError(f"data.path: {file}: no usable {source} sample in {len(lines)} lines"
                            f"{' (' + describe_problems(problems) + ')' if problems else ''}")
    offsets = np.zeros(len(pieces_ids) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces_ids], out=offsets[1:])
    return ChatSequences(tokens=np.concatenate(pieces_ids), learned=np.concatenate(pieces_learned),
                         offsets=offsets, rows_per_sample=rows_per_sample, report=report)


def describe_problems(problems: Dict[str, List[int]]) -> str:
    """"2 malformed JSON (lines 3, 9); 1 too long (line 7)" with at most LISTED_LINES numbers each."""
    parts = []
    for problem in (*PROBLEMS, "truncated"):
        lines = problems.get(problem)
        if not lines:
            continue
        shown = ", ".join(map(str, lines[:LISTED_LINES])) + (", ..." if len(lines) > LISTED_LINES else "")
        parts.append(f"{len(lines)} {problem} (line{'s' if len(lines) > 1 else ''} {shown})")
    return "; ".join(parts)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_or_tokenize_chat(files: Sequence[Path], source: str, loaded: LoadedTokenizer, template: ChatTemplate,
                          seq_len: int, too_long: str, cache_dir: Path) -> Tuple[ChatSequences, str]:
    """(the samples, their cache key), tokenized once and cached under ``<cache>/chat/``."""
    key = cache_key(["chat", CHAT_CACHE_VERSION, source, *(f"{f.resolve()}:{file_digest(f)}" for f in files),
                     hashlib.sha256(loaded.json_text.encode("utf-8")).hexdigest(), str(loaded.eod_id),
                     template.describe(), str(seq_len), too_long])
    arrays_path = cache_dir / "chat" / f"{key}.npz"
    report_path = cache_dir / "chat" / f"{key}.json"
    if report_path.is_file():  # written after the arrays: present means complete
        with np.load(arrays_path, allow_pickle=False) as arrays:
            meta = json.loads(report_path.read_text(encoding="utf-8"))
            return ChatSequences(tokens=arrays["tokens"], learned=arrays["learned"], offsets=arrays["offsets"],
                                 rows_per_sample=meta["rows_per_sample"], report=meta["report"]), key
    sequences = tokenize_files(files, source, loaded, template, seq_len, too_long)
    buffer = io.BytesIO()
    np.savez(buffer, tokens=sequences.tokens, learned=sequences.learned, offsets=sequences.offsets)
    arrays_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes_atomic(arrays_path, buffer.getvalue())
    write_text_atomic(report_path, json.dumps({"rows_per_sample": sequences.rows_per_sample,
                                               "report": sequences.report}))
    return sequences, key


# -- a split as a stream of batches ----------------------------------------------------------
def _aligned(ids: np.ndarray, learned: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of one sequence: labels[t] = ids[t + 1] where that token is learned."""
    labels = np.where(learned[1:], ids[1:], IGNORE_INDEX).astype(np.int64)
    return ids[:-1].astype(np.int64), labels


def pack_next_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> List[List[int]]:
    """Sample ids (visited in ``order``) grouped into rows of at most ``capacity`` positions, next-fit:
    a sample that does not fit the current row starts a new one."""
    rows: List[List[int]] = []
    used = capacity + 1
    for sample in order:
        length = int(lengths[sample])
        if used + length > capacity:
            rows.append([])
            used = 0
        rows[-1].append(int(sample))
        used += length
    return rows


class ChatDataset:
    """One split of chat samples as a seeded stream of Batches (see the module docstring)."""

    def __init__(self, sequences: ChatSequences, sample_ids: np.ndarray, *, seq_len: int, seed: int, split: str,
                 eod_id: int, packing: bool):
        self.sequences, self.seq_len, self.seed, self.split = sequences, seq_len, seed, split
        self.eod_id, self.packing = eod_id, packing
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.rows_per_sample = 1 if packing else sequences.rows_per_sample
        if packing:
            assert sequences.rows_per_sample == 1, "packing is for SFT samples"
            inputs = np.diff(sequences.offsets)[self.sample_ids] - 1
            order = np.random.Generator(np.random.PCG64([seed, SPLIT_CODES[split], PACKING_STREAM])).permutation(
                len(self.sample_ids))
            self.units = [self.sample_ids[row] for row in pack_next_fit(inputs, order, seq_len)]
        else:
            self.units = [np.asarray([s]) for s in self.sample_ids]
        self._order: Tuple[int, Optional[np.ndarray]] = (-1, None)

    @property
    def num_samples(self) -> int:
        """Units of the stream's epoch: samples, or packed rows."""
        return len(self.units)

    @property
    def num_docs(self) -> int:
        return len(self.sample_ids)

    @property
    def num_tokens(self) -> int:
        """Input tokens of the split (each sequence's length - 1), padding excluded."""
        per_sequence = np.diff(self.sequences.offsets).reshape(-1, self.sequences.rows_per_sample) - 1
        return int(per_sequence[self.sample_ids].sum())

    def order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, SPLIT_CODES[self.split], epoch]))
            self._order = (epoch, rng.permutation(self.num_samples))
        return self._order[1]

    def batch(self, start: int, count: int) -> Batch:
        """Stream positions start .. start + count - 1."""
        n = self.num_samples
        return self.batch_of([int(self.order(p // n)[p % n]) for p in range(start, start + count)])

    def batch_of(self, units: Sequence[int]) -> Batch:
        """The Batch of the given units, in order: rows_per_sample rows each."""
        num_rows = len(units) * self.rows_per_sample
        inputs = np.full((num_rows, self.seq_len), self.eod_id, dtype=np.int64)
        labels = np.full((num_rows, self.seq_len), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((num_rows, self.seq_len), dtype=np.int64) if self.packing else None
        documents = np.zeros((num_rows, self.seq_len), dtype=np.int64) if self.packing else None
        unit_of_row = np.repeat(np.asarray(units, dtype=np.int64), self.rows_per_sample)
        for unit_number, unit in enumerate(units):
            samples = self.units[unit]
            if self.packing:
                row, used = unit_number, 0
                for document, sample in enumerate(samples):
                    x, y = _aligned(*self.sequences.sequence(int(sample)))
                    inputs[row, used:used + len(x)], labels[row, used:used + len(x)] = x, y
                    positions[row, used:used + len(x)] = np.arange(len(x))
                    documents[row, used:used + len(x)] = document
                    used += len(x)
                positions[row, used:] = np.arange(self.seq_len - used)  # the padding: a document of its own
                documents[row, used:] = len(samples)
                continue
            for r in range(self.rows_per_sample):
                row = unit_number * self.rows_per_sample + r
                x, y = _aligned(*self.sequences.sequence(int(samples[0]) * self.rows_per_sample + r))
                inputs[row, :len(x)], labels[row, :len(x)] = x, y
        as_tensor = (lambda a: None if a is None else torch.from_numpy(a))  # noqa: E731
        return Batch(input_ids=torch.from_numpy(inputs), labels=torch.from_numpy(labels),
                     position_ids=as_tensor(positions), document_ids=as_tensor(documents),
                     extras={SAMPLE_INDEX: torch.from_numpy(unit_of_row)})


@dataclass
class ChatDataBundle:
    train: ChatDataset
    valid: ChatDataset
    test: Optional[ChatDataset]
    tokenizer: Tokenizer
    eod_id: int
    tokenizer_vocab_size: int
    signature: str  # the tokenized data's cache key: what a precomputed reference is checked against
    report: Dict[str, Dict[str, List[int]]]

    def train_batch(self, start: int, count: int) -> Batch:
        """Stream positions start .. start + count - 1 of the train split."""
        return self.train.batch(start, count)

    def eval_batch(self, count: int) -> Batch:
        """The first ``count`` validation units in their fixed order (fewer when the split is smaller:
        every held-out sample once, never repeated)."""
        return self.valid.batch_of(range(min(count, self.valid.num_samples)))

    def describe(self) -> str:
        unit = "pairs" if self.train.sequences.rows_per_sample == 2 else "samples"
        packed = f" in {self.train.num_samples} packed rows" if self.train.packing else ""
        return (f"train {self.train.num_docs} {unit}{packed} / {self.train.num_tokens:,} tokens, "
                f"valid {self.valid.num_docs} {unit} / {self.valid.num_tokens:,} tokens, "
                f"tokenizer vocab {self.tokenizer_vocab_size}")


def build_chat_datasets(data_cfg: DataConfig, loaded: LoadedTokenizer, seq_len: int, seed: int,
                        warn: Callable[[str], None]) -> ChatDataBundle:
    """The chat splits of data_cfg (data.source sft or preference), tokenized by ``loaded``."""
    files = chat_files(data_cfg.path)
    template = resolve_template(data_cfg.chat_template)
    sequences, key = load_or_tokenize_chat(files, data_cfg.source, loaded, template, seq_len, data_cfg.too_long,
                                           resolve_cache_dir(data_cfg.cache_dir))
    for file, problems in sequences.report.items():
        if problems:
            warn(f"data.path: {file}: {describe_problems(problems)}"
                 f"{'' if list(problems) == ['truncated'] else ' (skipped)'}")
    if sequences.num_samples < 2:
        raise DataError(f"data.path: {sequences.num_samples} usable chat sample(s); need at least 2 (one is held "
                        "out for validation)")
    valid_ids, test_ids = held_out_doc_ids(sequences.sample_lengths(), data_cfg.val_fraction,
                                           data_cfg.test_fraction)
    train_ids = np.setdiff1d(np.arange(sequences.num_samples), np.concatenate([valid_ids, test_ids]))

    def split(ids: np.ndarray, name: str) -> ChatDataset:
        return ChatDataset(sequences, ids, seq_len=seq_len, seed=seed, split=name, eod_id=loaded.eod_id,
                           packing=data_cfg.packing)

    return ChatDataBundle(train=split(train_ids, "train"), valid=split(valid_ids, "valid"),
                          test=split(test_ids, "test") if len(test_ids) else None, tokenizer=loaded.tokenizer,
                          eod_id=loaded.eod_id, tokenizer_vocab_size=id_space_size(loaded.tokenizer),
                          signature=key, report=sequences.report)
