"""Shared fixtures."""
import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenizer/corpus cache shared by the tests that train (tokenizer training is the slow part)."""
    return tmp_path_factory.mktemp("megacpm-cache")
