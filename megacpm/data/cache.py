"""Where the data pipeline keeps what it derives (tokenizers, tokenized corpora), and how it writes.

Every cache file is written under a temporary name and renamed into place, so a reader (or a
second rank racing the first) sees either no file or a complete one. Cache keys are hashes of
everything the content depends on: a stale entry is never reused, it is simply not found.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from megacpm.io import atomic  # the same crash-safe write as checkpoints

CACHE_ENV_VAR = "MEGACPM_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/megacpm"


def resolve_cache_dir(configured: Optional[str]) -> Path:
    """data.cache_dir if set, else $MEGACPM_CACHE, else ~/.cache/megacpm."""
    chosen = configured or os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


def cache_key(parts: Iterable[str]) -> str:
    """A short, stable hash of the given strings (in order)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text_atomic(path, text)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes_atomic(path, buffer.getvalue())
