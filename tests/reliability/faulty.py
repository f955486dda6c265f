"""Run ``megacpm`` with the file system failing the way a full or read-only disk does.

    python tests/reliability/faulty.py ERRNO MATCH -- megacpm ARGS...

Every write-mode open, mkdir, rename or write whose path contains MATCH raises
``OSError(ERRNO, strerror, path)``, exactly what the kernel returns on a full disk (ENOSPC) or a
read-only mount (EROFS) — which a test cannot create on a CI machine without privileges. Opening
for reading is left alone, so the run can be validated and read as it would on that disk.
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import sys


def install(code: int, match: str) -> None:
    def refuse(path) -> None:
        if match in os.fspath(path) if isinstance(path, (str, bytes, os.PathLike)) else False:
            raise OSError(code, os.strerror(code), os.fspath(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_rename, real_replace = os.rename, os.replace

    def open_(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        refuse(dst)
        return real_rename(src, dst, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        refuse(dst)
        return real_replace(src, dst, *args, **kwargs)

    builtins.open, io.open, os.open, os.mkdir, os.rename, os.replace = open_, open_, os_open, mkdir, rename, replace


def main() -> None:
    code, match, dashes, prog, *args = sys.argv[1:]
    assert dashes == "--" and prog == "megacpm", sys.argv
    install(getattr(errno, code), match)
    from megacpm.cli import main as cli_main

    sys.exit(cli_main(args))


if __name__ == "__main__":
    main()
