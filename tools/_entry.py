"""What the tools' main() functions share: every failure a user can cause is one line,
``<tool>: error: PATH: cause``, with an exit status, never a traceback; SIGTERM is an interruption.

A tool imports it as ``from _entry import ...`` (tools/ is on sys.path when a tool runs as a script;
a tool imported from its path, as the tests do, puts it there first: see ``tools_on_path``).

- the tool's own error classes map to their exit statuses (e.g. ``{ToolError: 2, DataError: 1}``);
- ``EntryPointError`` (megacpm.io.errors: already one line naming the path) exits 1;
- ``OSError`` becomes ``describe_os_error``'s ``PATH: cause`` (no space left, permission denied, a
  part of the path is a file, ...), exit 1;
- ``UnicodeDecodeError`` that no reader named a file for becomes its offset and byte, exit 1;
- Ctrl-C exits 130 and SIGTERM (with ``sigterm=True``) 143, each with one line: the tool's
  cleanup (``atomic_directory``, the indexed-dataset writer) has run by then, as for any exception.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Callable, Dict, Optional, Type

from megacpm.io.errors import EntryPointError, decode_cause, describe_os_error

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every ``finally`` and ``except BaseException``
    cleanup runs (temporary outputs removed) before the tool exits."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``PROG: error: ...``, exit 2) without the usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def interrupt_on_sigterm():
    """Turn SIGTERM into ``Terminated`` in the main thread (a second SIGTERM during the cleanup is
    ignored, so the cleanup completes); returns the previous handler (None off the main thread,
    where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return "; ".join(lines)


def fail(prog: str, message: str, status: int) -> int:
    print(f"{prog}: error: {one_line(message) or 'failed'}", file=sys.stderr)
    return status


def run_tool(prog: str, body: Callable[[], int], errors: Optional[Dict[Type[BaseException], int]] = None,
             interrupted: str = "interrupted", sigterm: bool = False) -> int:
    """``body()``'s exit status, or one line and a status for a failure (see the module doc). With
    ``sigterm``, SIGTERM interrupts ``body`` like Ctrl-C while it runs (the handler is restored after)."""
    errors = errors or {}
    previous = interrupt_on_sigterm() if sigterm else None
    try:
        return _run(prog, body, errors, interrupted)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(prog: str, body: Callable[[], int], errors: Dict[Type[BaseException], int], interrupted: str) -> int:
    try:
        return body()
    except Terminated:
        return fail(prog, interrupted, EXIT_TERMINATED)
    except KeyboardInterrupt:
        return fail(prog, interrupted, EXIT_INTERRUPTED)
    except EntryPointError as exc:
        return fail(prog, str(exc), EXIT_FAILURE)
    except BrokenPipeError:
        return 0  # stdout's reader went away (`tool ... | head`): not a failure
    except Exception as exc:
        for kind, status in errors.items():
            if isinstance(exc, kind):
                return fail(prog, str(exc), status)
        if isinstance(exc, UnicodeDecodeError):
            return fail(prog, decode_cause(exc), EXIT_FAILURE)
        if isinstance(exc, OSError):
            return fail(prog, describe_os_error(exc), EXIT_FAILURE)
        raise  # a bug: keep the traceback
