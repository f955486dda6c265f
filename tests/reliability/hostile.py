"""The hostile-input table's machinery: run a command as a user would (a real subprocess, so a
traceback printed by any library shows), then check the three promises of docs/reliability.md:

- one line: a non-zero exit, exactly one non-empty line on stderr, ``<prog>: error: ...`` matching
  the case's pattern, and no "Traceback" anywhere in the output;
- nothing touched: the files under the case's directory byte-identical to before (or the case's own
  invariant, for the cases that must recover instead);
- nothing half-written: no temporary name (``.tmp-``) left anywhere under the directory.

A case is a row: ``Hostile(name, argv, expect, setup=..., check=...)``. ``argv`` is a list whose
``{dir}`` items are the case's directory; ``argv[0]`` is ``megacpm``, ``faulty`` (megacpm on a
failing disk: tests/reliability/faulty.py) or a tools/ script name.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from tests.support import REPO, cli_env

TMP_PREFIX = ".tmp-"


def snapshot(root: Path) -> Dict[str, str]:
    """{relative path: sha256 of the bytes, or 'dir' / 'link -> target'} of everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            else:
                try:
                    out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
                except OSError as exc:  # a file the case made unreadable: its mode stands for it
                    out[rel] = f"unreadable ({exc.errno}) mode {path.stat().st_mode:o}"
    return out


def temporaries(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(f"{TMP_PREFIX}*"))


def command(argv: List[str], directory: Path) -> List[str]:
    args = [str(a).replace("{dir}", str(directory)) for a in argv]
    if args[0] == "megacpm":
        return [sys.executable, "-m", "megacpm", *args[1:]]
    if args[0] == "faulty":  # megacpm on a failing disk: faulty ERRNO MATCH -- megacpm ARGS
        return [sys.executable, str(Path(__file__).with_name("faulty.py")), *args[1:]]
    return [sys.executable, str(REPO / "tools" / f"{args[0]}.py"), *args[1:]]


@dataclass
class Hostile:
    name: str
    argv: List[str]
    expect: str  # a regex searched in the one error line
    setup: Optional[Callable[[Path], None]] = None  # builds the case's files in its directory
    # The invariant afterwards (given the directory and the snapshot taken before the command);
    # by default the directory must be byte-identical.
    check: Optional[Callable[[Path, Dict[str, str]], None]] = None
    env: Dict[str, str] = field(default_factory=dict)
    timeout: int = 300
    ok: bool = False  # the command must succeed (a recovery) instead of failing with one line

    def __str__(self) -> str:
        return self.name


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def run_command(argv: List[str], directory: Path, env: Optional[Dict[str, str]] = None,
                timeout: int = 300) -> Outcome:
    result = subprocess.run(command(argv, directory), cwd=directory, env={**cli_env(), **(env or {})},
                            capture_output=True, text=True, timeout=timeout, errors="replace")
    return Outcome(result.returncode, result.stdout, result.stderr)


def error_lines(stderr: str) -> List[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def assert_one_line(outcome: Outcome, expect: str, label: str) -> str:
    where = f"{label}\n--- stdout\n{outcome.stdout[-3000:]}\n--- stderr\n{outcome.stderr[-3000:]}"
    assert "Traceback" not in outcome.stderr + outcome.stdout, f"a traceback: {where}"
    assert outcome.returncode != 0, f"exit code 0: {where}"
    lines = error_lines(outcome.stderr)
    assert len(lines) == 1, f"{len(lines)} lines on stderr, not one: {where}"
    assert re.match(r"^[\w.-]+: error: ", lines[0]), f"not '<prog>: error: ...': {where}"
    assert re.search(expect, lines[0]), f"{expect!r} not in the line: {where}"
    return lines[0]


def run_hostile(case: Hostile, directory: Path) -> Outcome:
    directory.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(directory)
    before = snapshot(directory)
    outcome = run_command(case.argv, directory, case.env, case.timeout)
    if case.ok:
        assert outcome.returncode == 0 and "Traceback" not in outcome.stderr, (
            f"{case}: rc {outcome.returncode}\n{outcome.stderr[-3000:]}")
        if case.expect:
            assert re.search(case.expect, outcome.stdout + outcome.stderr), (
                f"{case}: {case.expect!r} not said\n{outcome.stdout[-2000:]}\n{outcome.stderr[-2000:]}")
    else:
        assert_one_line(outcome, case.expect, str(case))
    if case.check is not None:
        case.check(directory, before)
    else:
        after = snapshot(directory)
        changed = sorted(set(before.items()) ^ set(after.items()))
        assert after == before, f"{case}: the directory changed: {changed[:10]}"
    assert not temporaries(directory), f"{case}: temporaries left behind: {temporaries(directory)}"
    return outcome
