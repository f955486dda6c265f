"""Runs tests/kernels in a child pytest under Triton's CPU interpreter (TRITON_INTERPRET=1).

See tests/conftest.py for why the kernel tests need their own process.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL_TESTS = Path(__file__).resolve().parent / "kernels"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="already interpreted: tests/kernels is collected directly in this session")
def test_kernels_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(KERNEL_TESTS)],
                            env=env, capture_output=True, text=True, timeout=1500)
    print(result.stdout[-20000:])
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
