"""Shared fixtures, and the split between the torch-path suite and the interpreted kernel tests.

Triton decides at import time whether its kernels run in the CPU interpreter, so the kernel tests
in tests/kernels/ need TRITON_INTERPRET=1 set before anything imports triton. In a normal run they
are collected only by tests/test_kernels_interpreted.py, which runs them in a child pytest with that
variable set; the rest of the suite runs the torch path. To run them directly:
    TRITON_INTERPRET=1 python -m pytest tests/kernels
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["kernels"]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenizer/corpus cache shared by the tests that train (tokenizer training is the slow part)."""
    return tmp_path_factory.mktemp("megacpm-cache")
