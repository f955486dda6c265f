"""Helpers for tests that run the real `megacpm` command in a subprocess."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli_env():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_cli(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "megacpm", *map(str, args)], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_cli(*args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "megacpm", *map(str, args)], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
