"""Shared fixtures: a small CLI runner and one data cache for the whole session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenizer/corpus cache shared by the tests that train (tokenizer training is the slow part)."""
    return tmp_path_factory.mktemp("megacpm-cache")


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
