"""source: text — a file split at two or more blank lines, or a directory of .txt/.md files."""
import pytest

from megacpm.config.schema import DataConfig
from megacpm.data import DataError, build_datasets
from megacpm.data.corpus import split_documents, text_corpus

VOCAB = 300


def test_split_documents_at_two_blank_lines():
    text = "first doc\n\nstill first\n\n\nsecond\n \n\t\n\n\nthird\n\n\n\n"
    assert split_documents(text) == ["first doc\n\nstill first", "second", "third"]


def test_directory_of_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha " * 200, encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("# beta\n" * 200, encoding="utf-8")
    (tmp_path / "c.py").write_text("ignored", encoding="utf-8")
    assert len(text_corpus(str(tmp_path)).read_documents()) == 2


def test_build_from_text_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n\n".join(f"document {i}: " + "lorem ipsum dolor " * 30 for i in range(10)), encoding="utf-8")
    config = DataConfig(source="text", path=str(corpus), cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    bundle = build_datasets(config, vocab_size=VOCAB, seq_len=32, seed=3)
    assert (bundle.train_docs, bundle.valid_docs) == (8, 2)
    assert "lorem ipsum" in bundle.tokenizer.decode(bundle.train[0].tolist())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.txt", r"data\.path: .* does not exist"),
        (lambda p: (p / "one.txt").write_text("a single document") and p / "one.txt", r"need at least 2"),
        (lambda p: (p / "bad.txt").write_bytes(b"\xff\xfe\x00bad") and p / "bad.txt", r"data\.path: .* not UTF-8"),
    ],
)
def test_text_source_errors(tmp_path, make, message):
    config = DataConfig(source="text", path=str(make(tmp_path)), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=message):
        build_datasets(config, vocab_size=VOCAB, seq_len=8, seed=1)
