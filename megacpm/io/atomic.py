"""Crash-safe file and directory writes: temporary name, fsync, rename.

A reader (or a run resumed after kill -9) sees either the old content or the complete new content,
never a partial file: POSIX rename within one filesystem is atomic, and fsync of the file and of its
parent directory makes the new name durable before anything points at it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]

TMP_PREFIX = ".tmp-"


def fsync_dir(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: PathLike) -> None:
    """fsync every file under root and every directory, deepest first."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def tmp_sibling(path: PathLike) -> Path:
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and str(exc.filename) == str(tmp):
            # The user knows the file by its final name, not by our temporary one.
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(final: PathLike) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` only if the block completes.

    ``final`` must not exist yet. On any exception the temporary directory is removed.
    """
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    tmp = tmp_sibling(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_tmp(directory: PathLike) -> None:
    """Delete leftovers of writes interrupted by a crash (names starting with TMP_PREFIX)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
