"""A corpus: documents described cheaply (for cache keys) and read only when needed.

Also the ``source: text`` corpus. ``data.path`` is either

* a UTF-8 text file (strictly: a non-UTF-8 byte is an error naming the file and offset), split into documents at runs of two or more blank lines (a single blank line
  is a paragraph break inside a document), or
* a directory: every ``*.txt`` and ``*.md`` file below it (recursively, in sorted order) is one
  document.

Empty documents are dropped.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Sequence

from megacpm.data.errors import DataError
from megacpm.io.errors import describe_decode_error, describe_os_error

TEXT_SUFFIXES = (".txt", ".md")

# Two or more blank lines (lines holding only whitespace) end a document.
_DOCUMENT_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n){2,}")


@dataclass(frozen=True)
class Corpus:
    description: str  # for messages, e.g. "data.path /data/books"
    fingerprint: str  # changes whenever the documents may have changed
    read_documents: Callable[[], List[str]]


def file_fingerprint(files: Sequence[Path], root: Path, with_mtime: bool) -> str:
    """One line per file: path relative to root, size (and modification time)."""
    lines = []
    for path in files:
        stat = path.stat()
        line = f"{path.relative_to(root).as_posix()}\t{stat.st_size}"
        if with_mtime:
            line += f"\t{stat.st_mtime_ns}"
        lines.append(line)
    return "\n".join(lines)


def read_utf8(path: Path, config_key: str) -> str:
    """A text file's content, strictly UTF-8: a byte that is not is a DataError naming the file and
    the offset (``data.path: /x.txt: not UTF-8 text (byte 0xff at offset 12)``), not a lenient decode
    that would silently train on replacement characters."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{config_key}: {describe_decode_error(path, err)}") from None
    except OSError as err:
        raise DataError(f"{config_key}: {describe_os_error(err, path)}") from None


def split_documents(text: str) -> List[str]:
    """Documents of one text file: separated by two or more blank lines, stripped, none empty."""
    pieces = _DOCUMENT_BREAK.split(text.replace("\r\n", "\n"))
    return [piece.strip() for piece in pieces if piece.strip()]


def text_corpus(path: str) -> Corpus:
    """The ``source: text`` corpus at data.path (a file or a directory, see the module doc)."""
    root = Path(path).expanduser()
    if root.is_file():
        fingerprint = "text-file\n" + file_fingerprint([root], root.parent, with_mtime=True)
        return Corpus(
            description=f"data.path {root}",
            fingerprint=fingerprint,
            read_documents=lambda: split_documents(read_utf8(root, "data.path")),
        )
    if root.is_dir():
        files = sorted(
            p for p in root.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()
        )
        if not files:
            raise DataError(f"data.path: {root} holds no {' or '.join('*' + s for s in TEXT_SUFFIXES)} files")
        fingerprint = "text-dir\n" + file_fingerprint(files, root, with_mtime=True)

        def read_documents() -> List[str]:
            texts = (read_utf8(p, "data.path").strip() for p in files)
            return [text for text in texts if text]

        return Corpus(description=f"data.path {root}", fingerprint=fingerprint, read_documents=read_documents)
    if os.path.lexists(root):
        raise DataError(f"data.path: {root} is neither a file nor a directory")
    raise DataError(f"data.path: {root} does not exist")
