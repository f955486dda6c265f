"""The built-in corpus: the Python standard library's own source files.

They exist on every machine that runs megacpm, so the quickstart needs no download. Each ``.py``
file is one document: code, comments and docstrings, plus ``pydoc_data/topics.py``, which holds
the English text of the Python reference documentation.

The corpus is capped at ``data.max_corpus_mb``. Files are taken in a fixed pseudo-random order
(a hash of their path), so any cap yields a spread of modules rather than the alphabetically first
packages; the order does not depend on the training seed. The selection is deterministic for a
given Python installation.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from pathlib import Path
from typing import List, Tuple

from megacpm.data.corpus import Corpus, file_fingerprint
from megacpm.data.errors import DataError

# Directories whose files are not representative prose/code or are huge generated tables.
EXCLUDED_DIRS = frozenset(
    {
        "test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__",
        "encodings",  # codec tables: mostly hex literals
        "ensurepip", "turtledemo", "lib-dynload",
    }
)
EXCLUDED_PREFIXES = ("config-", "_sysconfigdata")  # build configuration, machine-generated

# Always considered first: the Python docs' English text.
PREFERRED_FILES = ("pydoc_data/topics.py",)

BYTES_PER_MB = 1024 * 1024


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_excluded_dir(name: str) -> bool:
    return name in EXCLUDED_DIRS or name.startswith(EXCLUDED_PREFIXES)


def _candidate_files(root: Path) -> List[Tuple[str, int]]:
    """(relative path, size) of every non-empty .py file under root outside the excluded dirs."""
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so the walk never enters site-packages (which can be huge) or tests.
        dirnames[:] = [name for name in dirnames if not _is_excluded_dir(name)]
        for name in filenames:
            if not name.endswith(".py") or name.startswith(EXCLUDED_PREFIXES):
                continue
            path = Path(dirpath, name)
            size = path.stat().st_size
            if size > 0:
                candidates.append((path.relative_to(root).as_posix(), size))
    return candidates


def _selection_order(relative_path: str) -> Tuple[int, str]:
    preferred = 0 if relative_path in PREFERRED_FILES else 1
    return preferred, hashlib.sha1(relative_path.encode("utf-8")).hexdigest()


def select_files(max_corpus_mb: float, root: Path | None = None) -> List[Path]:
    """The corpus files: greedily in selection order, each taken if it still fits the cap."""
    if not max_corpus_mb > 0:
        raise DataError(f"data.max_corpus_mb must be positive, got {max_corpus_mb}")
    root = root or stdlib_root()
    budget = int(max_corpus_mb * BYTES_PER_MB)
    chosen = []
    for relative, size in sorted(_candidate_files(root), key=lambda item: _selection_order(item[0])):
        if size <= budget:
            chosen.append(relative)
            budget -= size
    if not chosen:
        raise DataError(f"data.max_corpus_mb {max_corpus_mb} selects no file of the standard library at {root}")
    return [root / relative for relative in sorted(chosen)]


def read_source(path: Path) -> str:
    """A stdlib file as text. Undecodable bytes (none in CPython 3.11, but the corpus must never
    fail on some distribution's patched file) become U+FFFD instead of an error."""
    return path.read_bytes().decode("utf-8", errors="replace")


def embedded_corpus(max_corpus_mb: float) -> Corpus:
    root = stdlib_root()
    files = select_files(max_corpus_mb, root)

    def read_documents() -> List[str]:
        return [read_source(path) for path in files]

    # Sizes without mtimes: installs of the same Python (containers, other machines sharing a
    # cache) differ in mtimes only. The version catches an upgrade that keeps every size.
    fingerprint = f"embedded python-{platform.python_version()}\n" + file_fingerprint(files, root, with_mtime=False)
    return Corpus(
        description=f"the embedded corpus ({len(files)} files of {root})",
        fingerprint=fingerprint,
        read_documents=read_documents,
    )
