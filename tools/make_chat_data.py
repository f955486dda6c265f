#!/usr/bin/env python
"""Build the SFT and DPO demo data from the embedded corpus: the Python standard library's sources.

  python tools/make_chat_data.py [--out data/chat-demo] [--max-corpus-mb 8] [--max-chars 600] \\
      [--max-samples N] [--max-pairs 2000] [--seed 0] [--source-dir DIR]

Nothing is downloaded: the standard library exists on every machine (the files of
megacpm.data.embedded.select_files, the pretraining corpus of ``megacpm train tiny``), and every
function or method in it that has a docstring is a ready-made instruction / answer pair:

* ``OUT/sft.jsonl``: ``{"prompt": ..., "response": ...}`` per function. The prompt is the function's
  ``def`` line(s) and its docstring, the response the rest of its body, both as source text with
  the function's own indentation removed (a method's lines start where a top-level function's do),
  so prompt + response is the function's source again (without decorators and without blank lines
  between the docstring and the body): code of the kind the tiny model was pretrained on. The
  prompt ends with a newline, the response does not.
* ``OUT/preference.jsonl``: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` per function, the
  same prompt, its true body as ``chosen`` and the body of ANOTHER function as ``rejected``: picked
  by --seed among the 20 samples nearest in length, half of them shorter and half longer (never the
  same body text, and never one that would make prompt + rejected longer than --max-chars), so
  length alone does not give the answer away. Telling a function's body from a stranger's is a task a tiny model can learn: names and
  arguments of the signature reappear in the body, the docstring says what it returns, so DPO's
  preference accuracy on held-out pairs rises above chance (0.5).

Skipped (and counted, per reason): functions without a docstring; those whose body after the
docstring is empty or trivial (only ``pass``, ``...`` or ``raise NotImplementedError``); those
whose prompt + response is longer than --max-chars characters (600 fits a 256-token row of the
tiny model); an odd layout (the docstring on the ``def`` line, a statement after it on its line, a
``def`` after another statement on its line); exact duplicates of an earlier sample; and, with
--max-samples, those left out of the seeded subset. Files that do not parse (a SyntaxError, bytes
that are not in the file's declared encoding) are skipped and counted. The order is deterministic:
by file path, then line. The same arguments give byte-identical files.

--source-dir DIR reads every ``*.py`` file under DIR instead of the standard library (--max-corpus-mb
then does not apply): for tests, or a chat set from any code base.

--max-pairs N keeps a seeded subset of N preference pairs (default 2000): DPO's reference
precompute scores every pair once before the first step, and the tiny demo trains on 1,200 (150
steps of 8): scoring all 3,000-odd would take longer than the training on 2 cores.

Each file is written atomically (a temporary name in OUT, then a rename). One summary line per file
is printed: its path, its number of samples, and the skip counts.

Exit status: 0 done; 1 no sample at all or a write error; 2 bad arguments; 130 Ctrl-C, 143 SIGTERM.
Errors are one line: ``make_chat_data: error: ...``.
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import math
import os
import random
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _entry, when imported from its path

from _entry import OneLineParser, run_tool  # noqa: E402

from megacpm.data.embedded import select_files, stdlib_root  # noqa: E402
from megacpm.data.errors import DataError  # noqa: E402
from megacpm.io.atomic import write_text_atomic  # noqa: E402

PROG = "make_chat_data"
SFT_FILE = "sft.jsonl"
PREFERENCE_FILE = "preference.jsonl"
NEAREST = 20  # the rejected body is drawn from this many candidates nearest in length

# Skip reasons, in the order they are reported.
NO_DOCSTRING = "without a docstring"
EMPTY = "with an empty body"
TRIVIAL = "with a trivial body"
TOO_LONG = "too long"
LAYOUT = "with an odd layout"
DUPLICATE = "duplicate"
OVER_MAX = "over --max-samples"
REASONS = (NO_DOCSTRING, EMPTY, TRIVIAL, TOO_LONG, LAYOUT, DUPLICATE, OVER_MAX)


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2, nothing written."""


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the source root, for the order
    line: int
    prompt: str
    response: str


@dataclass
class Extraction:
    samples: List[Sample] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=lambda: {reason: 0 for reason in REASONS})
    files: int = 0
    unparsable_files: int = 0
    no_rejected: int = 0  # samples with no other body to pair with (preference.jsonl only)
    over_max_pairs: int = 0  # pairs left out of --max-pairs' subset


# --- extraction ------------------------------------------------------------------------------------


def decode_source(data: bytes) -> str:
    """The file's text in its declared encoding (PEP 263, UTF-8 by default), newlines normalised to
    ``\\n`` as the parser sees them. Raises SyntaxError (a bad coding cookie) or UnicodeDecodeError."""
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    text = data.decode(encoding)
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def is_trivial(statement: ast.stmt) -> bool:
    """``pass``, ``...`` or ``raise NotImplementedError`` / ``raise NotImplementedError(...)``."""
    if isinstance(statement, ast.Pass):
        return True
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        return statement.value.value is Ellipsis
    if isinstance(statement, ast.Raise) and statement.exc is not None and statement.cause is None:
        exc = statement.exc.func if isinstance(statement.exc, ast.Call) else statement.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def leading_whitespace(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t\f"))]


def dedent(lines: List[str], prefix: str) -> List[str]:
    """Remove ``prefix`` from every line that has it; blank lines become empty, other lines (the
    continuation of a multi-line string written further left) stay as they are."""
    out = []
    for line in lines:
        if line.startswith(prefix):
            out.append(line[len(prefix):])
        elif not line.strip():
            out.append("")
        else:
            out.append(line)
    return out


def function_nodes(tree: ast.AST) -> List[ast.AST]:
    nodes = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return sorted(nodes, key=lambda node: (node.lineno, node.col_offset))


def split_function(node: ast.AST, lines: List[str]) -> Tuple[Optional[str], Optional[Tuple[str, str]]]:
    """(skip reason, None) or (None, (prompt, response)) for one function. ``lines`` are the file's
    lines, ``lines[i - 1]`` being line i of the parser."""
    body = node.body
    docstring = body[0]
    if not (isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
            and isinstance(docstring.value.value, str)):
        return NO_DOCSTRING, None
    rest = body[1:]
    if not rest:
        return EMPTY, None
    if all(is_trivial(statement) for statement in rest):
        return TRIVIAL, None
    def_line = lines[node.lineno - 1]
    keyword = "async def " if isinstance(node, ast.AsyncFunctionDef) else "def "
    if (not def_line.lstrip().startswith(keyword) or docstring.lineno == node.lineno
            or rest[0].lineno <= docstring.end_lineno):
        return LAYOUT, None
    indent = leading_whitespace(def_line)
    prompt_lines = dedent(lines[node.lineno - 1: docstring.end_lineno], indent)
    response_lines = dedent(lines[docstring.end_lineno: node.end_lineno], indent)
    while response_lines and not response_lines[0].strip():
        response_lines.pop(0)
    while response_lines and not response_lines[-1].strip():
        response_lines.pop()
    return None, ("\n".join(prompt_lines) + "\n", "\n".join(response_lines))


def source_files(source_dir: Optional[Path], max_corpus_mb: float) -> Iterator[Tuple[str, Path]]:
    """(path relative to the root, path) of each file to read, sorted by the relative path."""
    if source_dir is not None:
        root = source_dir
        paths = [path for path in root.rglob("*.py") if path.is_file() and "__pycache__" not in path.parts]
    else:
        root = stdlib_root()
        paths = select_files(max_corpus_mb, root)
    for relative, path in sorted((path.relative_to(root).as_posix(), path) for path in paths):
        yield relative, path


def extract(files: Iterator[Tuple[str, Path]], max_chars: int) -> Extraction:
    result = Extraction()
    seen = set()
    for relative, path in files:
        result.files += 1
        try:
            text = decode_source(path.read_bytes())
            tree = ast.parse(text, filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # ValueError: null bytes (Python < 3.12)
            result.unparsable_files += 1
            continue
        lines = text.split("\n")
        for node in function_nodes(tree):
            reason, pair = split_function(node, lines)
            if reason is None:
                prompt, response = pair
                if len(prompt) + len(response) > max_chars:
                    reason = TOO_LONG
                elif pair in seen:
                    reason = DUPLICATE
            if reason is not None:
                result.skipped[reason] += 1
                continue
            seen.add(pair)
            result.samples.append(Sample(relative, node.lineno, prompt, response))
    return result


def subsample(result: Extraction, max_samples: Optional[int], seed: int) -> None:
    """Keep a seeded subset of ``max_samples`` samples, in their order."""
    if max_samples is None or len(result.samples) <= max_samples:
        return
    kept = sorted(random.Random(seed).sample(range(len(result.samples)), max_samples))
    result.skipped[OVER_MAX] += len(result.samples) - max_samples
    result.samples = [result.samples[i] for i in kept]


# --- preference pairs ------------------------------------------------------------------------------


def rejected_indices(samples: List[Sample], max_chars: int, seed: int) -> List[Optional[int]]:
    """For each sample, the index of the sample whose body is its rejected one (None if no other
    body fits): drawn with ``random.Random(seed)`` among the NEAREST samples nearest in the order of
    body length, taken alternately on either side, whose body text differs and keeps prompt +
    rejected within ``max_chars``."""
    rng = random.Random(seed)
    by_length = sorted(range(len(samples)), key=lambda i: (len(samples[i].response), i))
    chosen: List[Optional[int]] = [None] * len(samples)
    for rank, index in enumerate(by_length):
        sample = samples[index]
        budget = max_chars - len(sample.prompt)
        candidates: List[int] = []
        left, right, step_left = rank - 1, rank + 1, True
        while len(candidates) < NEAREST and (left >= 0 or right < len(by_length)):
            # Alternately the next shorter-or-equal and the next longer-or-equal one, so that the
            # rejected body is as often longer as it is shorter than the chosen one.
            if left >= 0 and (step_left or right >= len(by_length)):
                other, left = by_length[left], left - 1
            else:
                other, right = by_length[right], right + 1
            step_left = not step_left
            body = samples[other].response
            if body != sample.response and len(body) <= budget:
                candidates.append(other)
        if candidates:
            chosen[index] = rng.choice(candidates)
    return chosen


# --- output ----------------------------------------------------------------------------------------


def jsonl(rows: List[Dict[str, str]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def build(args: argparse.Namespace) -> Tuple[List[Dict[str, str]], List[Dict[str, str]], Extraction]:
    """(sft rows, preference rows, the extraction with its counts); writes nothing."""
    result = extract(source_files(args.source_dir, args.max_corpus_mb), args.max_chars)
    if not result.samples:
        where = args.source_dir if args.source_dir is not None else f"the standard library at {stdlib_root()}"
        raise DataError(f"no function with a docstring, a body and at most --max-chars {args.max_chars} "
                        f"characters in {result.files} files of {where}")
    subsample(result, args.max_samples, args.seed)
    samples = result.samples
    sft = [{"prompt": s.prompt, "response": s.response} for s in samples]
    preference = []
    for sample, other in zip(samples, rejected_indices(samples, args.max_chars, args.seed)):
        if other is None:
            result.no_rejected += 1
            continue
        preference.append({"prompt": sample.prompt, "chosen": sample.response, "rejected": samples[other].response})
    if args.max_pairs is not None and len(preference) > args.max_pairs:
        kept = sorted(random.Random(args.seed + 1).sample(range(len(preference)), args.max_pairs))
        result.over_max_pairs = len(preference) - args.max_pairs
        preference = [preference[i] for i in kept]
    return sft, preference, result


def summary(out: Path, sft: List, preference: List, result: Extraction) -> Tuple[str, str]:
    skipped = ", ".join(f"{result.skipped[reason]} {reason}" for reason in REASONS)
    sft_line = (f"{out / SFT_FILE}: {len(sft)} samples from {result.files} files "
                f"(skipped functions: {skipped}; {result.unparsable_files} unparsable files)")
    preference_line = (f"{out / PREFERENCE_FILE}: {len(preference)} samples "
                       f"(skipped: {result.no_rejected} without another body that fits, "
                       f"{result.over_max_pairs} over --max-pairs)")
    return sft_line, preference_line


def make_chat_data(args: argparse.Namespace) -> Tuple[str, str]:
    """Write both files; returns their summary lines."""
    sft, preference, result = build(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / SFT_FILE, jsonl(sft))
    write_text_atomic(args.out / PREFERENCE_FILE, jsonl(preference))
    return summary(args.out, sft, preference, result)


# --- arguments -------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description="Write SFT and preference jsonl (prompt: a function's "
                           "signature and docstring, response: its body) from the standard library's sources.")
    parser.add_argument("--out", type=Path, default=Path("data/chat-demo"), metavar="DIR",
                        help=f"writes DIR/{SFT_FILE} and DIR/{PREFERENCE_FILE} (default: data/chat-demo)")
    parser.add_argument("--max-corpus-mb", type=float, default=8.0, metavar="MB",
                        help="the standard library files read, as data.max_corpus_mb (default: 8)")
    parser.add_argument("--max-chars", type=int, default=600, metavar="N",
                        help="skip functions whose prompt + response is longer (default: 600)")
    parser.add_argument("--max-samples", type=int, default=None, metavar="N",
                        help="keep a seeded subset of N samples (default: all)")
    parser.add_argument("--max-pairs", type=int, default=2000, metavar="N",
                        help="keep a seeded subset of N preference pairs (default: 2000; 0: all)")
    parser.add_argument("--seed", type=int, default=0, help="the rejected bodies and the subsets (default: 0)")
    parser.add_argument("--source-dir", type=Path, default=None, metavar="DIR",
                        help="read every *.py under DIR instead of the standard library")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if not args.max_chars > 0:
        raise UsageError(f"--max-chars: must be > 0, got {args.max_chars}")
    if not (args.max_corpus_mb > 0 and math.isfinite(args.max_corpus_mb)):
        raise UsageError(f"--max-corpus-mb: must be a positive number, got {args.max_corpus_mb}")
    if args.max_samples is not None and args.max_samples < 1:
        raise UsageError(f"--max-samples: must be >= 1, got {args.max_samples}")
    if args.max_pairs < 0:
        raise UsageError(f"--max-pairs: must be >= 0, got {args.max_pairs}")
    if args.max_pairs == 0:
        args.max_pairs = None
    if args.source_dir is not None and not args.source_dir.is_dir():
        state = "is not a directory" if args.source_dir.exists() else "does not exist"
        raise UsageError(f"--source-dir: {args.source_dir} {state}")
    ancestor = args.out
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if os.path.lexists(ancestor) and not ancestor.is_dir():
        raise UsageError(f"--out: {ancestor} is a file, not a directory")
    for name in (SFT_FILE, PREFERENCE_FILE):
        if (args.out / name).is_dir():
            raise UsageError(f"--out: {args.out / name} is a directory")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        check_args(args)
        for line in make_chat_data(args):
            print(line)
        return 0

    return run_tool(PROG, body, {UsageError: 2, DataError: 1}, sigterm=True)


if __name__ == "__main__":
    sys.exit(main())
