"""tools/make_long_context_data.py: documents whose second half repeats the first, the mixture's
long-document share, the word-level tokenizer, determinism and its one-line errors."""
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_long_context_data.py"
ARGS = ["--words", "64", "--short-words", "12", "--long-words", "40", "--short-docs", "50", "--mixture-docs", "60"]


def _make(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), "--out", str(out), *ARGS, *extra], capture_output=True,
                          text=True, timeout=120)


def _documents(path: Path):
    return path.read_text(encoding="utf-8").strip().split("\n\n\n")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("long-context-data")
    result = _make(out)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_each_document_repeats_a_passage_of_distinct_words(made):
    out, _ = made
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    lengths = {}
    for name, most in (("short.txt", 12), ("long.txt", 40)):
        docs = _documents(out / name)
        for doc in docs:
            first, second = doc.split(" ; ")
            assert second == first + " .", doc
            words = first.split()
            assert len(set(words)) == len(words) and most // 2 <= len(words) <= most, doc
            ids = tokenizer.encode(doc).ids
            assert len(ids) == 2 * len(words) + 2 and 0 not in ids  # one token per word and mark, none unknown
        lengths[name] = {len(d.split(" ; ")[0].split()) for d in docs}
    assert len(lengths["short.txt"]) > 3  # the passage length varies: a fixed look-back would not copy


def test_the_mixture_holds_the_asked_share_of_long_document_tokens(made):
    out, stdout = made
    docs = _documents(out / "mixture.txt")
    assert len(docs) == 60
    tokens = [2 * len(d.split(" ; ")[0].split()) + 2 for d in docs]
    long_tokens = sum(t for d, t in zip(docs, tokens) if len(d.split(" ; ")[0].split()) > 12)
    assert long_tokens / sum(tokens) == pytest.approx(0.44, abs=0.1)
    assert "mixture.txt (60" in stdout


def test_the_same_arguments_give_the_same_bytes(made, tmp_path):
    out, _ = made
    assert _make(tmp_path).returncode == 0
    for name in ("short.txt", "mixture.txt", "long.txt", "tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


@pytest.mark.parametrize("extra, fragment", [
    (["--long-words", "65"], "--short-words and --long-words must be in 1..--words 64"),
    (["--long-share", "1.5"], "--long-share 1.5"),
    (["--short-docs", "1"], "at least 2"),
])
def test_bad_arguments_are_one_line(tmp_path, extra, fragment):
    result = _make(tmp_path / "out", *extra)
    assert result.returncode == 2
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
