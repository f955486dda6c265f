"""One live trainer per run directory: an OS file lock on ``RUN/.lock`` held for the run's life.

The lock is ``flock(2)`` on an open file, so the kernel releases it when the process ends in any way
(exit, exception, kill -9, a node's crash on NFS once the server notices): a stale lock cannot
outlive its holder, and no "remove the lock file by hand" step exists. The file itself stays; its
content (pid, host, start time of the holder) is only a message for the one refused, written through
the locked descriptor, never by rename (a renamed file would be a new inode, and a second trainer
could lock the old one).

Under torchrun only the job's rank 0 takes it: the ranks of one job share their job's lock, and a
second job is refused on its rank 0 before any rank writes anything. On NFS, ``flock`` is carried
by the server's POSIX locks (Linux clients since 2.6.12); Lustre needs the ``flock`` mount option.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional, Union

from megacpm.io.run_dir import LOCK_FILE


class RunLocked(RuntimeError):
    """Another live process holds the run directory's lock: the message names it."""


class RunLock:
    """``RunLock(run_dir)``: ``acquire()`` takes the lock or raises RunLocked; ``release()`` (or the
    process's end) gives it back. ``acquire(create=False)`` takes it only when the lock file already
    exists, creating nothing, and neither does acquiring write: a trainer can hold a run it is about
    to reject without changing a byte of it (``announce()`` writes the holder, after validation)."""

    def __init__(self, run_dir: Union[str, os.PathLike]):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, create: bool = True) -> bool:
        """True once held (by this call or an earlier one); False when ``create`` is False and there
        is no lock file yet."""
        if self._fd is not None:
            return True
        flags = os.O_RDWR | (os.O_CREAT if create else 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            if create:
                raise
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLocked(
                    f"{self.path.parent}: in use by another trainer ({holder or 'holder unknown'}); it holds "
                    f"{self.path}. Stop that run first, or choose another run.dir") from None
            raise
        self._fd = fd
        return True

    def announce(self) -> None:
        """Write who holds the lock into the lock file (for the message of the one refused). Called
        once the run is validated: a trainer that then rejects the run leaves the file as it was."""
        text = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
