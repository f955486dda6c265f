"""One line for a failure of the operating system or of a file's bytes, naming the path and the cause.

Every entry point (``megacpm VERB``, the tools) turns an ``OSError`` or a ``UnicodeDecodeError`` that
reaches it into ``describe_os_error`` / ``describe_decode_error``'s line: a user whose disk filled at
step 90,000 reads "no space left on device" and the path, not a traceback from inside a writer.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]

# Causes a user can act on, in their words; any other errno falls back to the OS's own text.
_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "is a directory, not a file",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.EIO: "input/output error (the disk or the network file system failed)",
    errno.EFBIG: "file too large for this file system (or the process's file-size limit)",
    errno.ENOTEMPTY: "directory not empty",
    errno.EXDEV: "cannot rename across file systems",
}


class EntryPointError(RuntimeError):
    """A failure already phrased as one line for the user (path and cause)."""


def print_warning(text: str) -> None:
    """One ``megacpm: warning: TEXT`` line on stderr: a problem that does not stop the run."""
    print(f"megacpm: warning: {text}", file=sys.stderr, flush=True)


def os_error_cause(exc: OSError) -> str:
    if exc.errno in _CAUSES:
        return _CAUSES[exc.errno]
    return (exc.strerror or str(exc) or type(exc).__name__).strip().splitlines()[0]


def describe_os_error(exc: OSError, path: Optional[PathLike] = None) -> str:
    """``PATH: cause`` (``PATH -> OTHER: cause`` for a rename or link), the path from ``path`` or the
    exception. For ENOSPC it adds what a user does next."""
    where = path if path is not None else exc.filename
    if where is not None and path is None and exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}"
    cause = os_error_cause(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        cause += " (free space, or point the run elsewhere, then start the same command again)"
    return f"{where}: {cause}" if where is not None else cause


def decode_cause(exc: UnicodeDecodeError) -> str:
    """``not UTF-8 text (byte 0xff at offset 12)``."""
    byte = exc.object[exc.start:exc.start + 1]
    shown = f"byte 0x{byte[0]:02x} " if byte else ""
    return f"not UTF-8 text ({shown}at offset {exc.start})"


def describe_decode_error(path: PathLike, exc: UnicodeDecodeError) -> str:
    """``PATH: not UTF-8 text (byte 0xff at offset 12)``."""
    return f"{Path(path)}: {decode_cause(exc)}"


def read_text(path: PathLike) -> str:
    """A UTF-8 text file's content; undecodable bytes raise ``EntryPointError`` naming path and offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EntryPointError(describe_decode_error(path, exc)) from None
