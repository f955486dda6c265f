"""tools/preprocess_data.py: jsonl and text in, a Megatron indexed dataset out.

The tokenizer is a tiny byte-level BPE trained here (any text round-trips through it), so the
outputs can be decoded back and compared with the input documents. The main runs go through the
command line as a user types it, in subprocesses side by side (each mostly imports torch); option
variants and argument errors call the tool's main() in this process.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megacpm.data import IndexedDataset
from tests.support import imported_tool

TOOL = Path(__file__).resolve().parents[2] / "tools" / "preprocess_data.py"
EOD = "<|endoftext|>"

# Enough documents for several worker chunks, so --workers 2 really interleaves.
JSONL_DOCS = ["Hello world.", "  Leading and trailing spaces stay.  ", "Zeilen\nund Umlaute: äöü — ok", "x" * 300]
JSONL_DOCS += [f"document {i}: " + "lorem ipsum " * (i % 7) for i in range(300)]
TEXT_DOCS = ["First text document.\n\nA second paragraph of it.", "Second text document."]
ALL_DOCS = JSONL_DOCS + TEXT_DOCS

BAD_ARGUMENTS = {  # name: (arguments, expected in the error line)
    "missing input": (["--input", "{root}/missing.jsonl", "--tokenizer", "{root}/tokenizer.json"],
                      "missing.jsonl does not exist"),
    "missing tokenizer": (["--input", "{root}/docs.jsonl", "--tokenizer", "{root}/missing.json"],
                          "missing.json does not exist"),
    "no tokenizer option": (["--input", "{root}/docs.jsonl"], "required: --tokenizer"),
    "no eod token": (["--input", "{root}/docs.jsonl", "--tokenizer", "{root}/no-eod.json", "--append-eod"],
                     "no end-of-document token"),
    "not a tokenizer": (["--input", "{root}/docs.jsonl", "--tokenizer", "{root}/docs.txt"],
                        "not a tokenizers JSON file"),
    # "... the sentencepiece package is not installed" or, where it is, "... not a SentencePiece model"
    "sentencepiece": (["--input", "{root}/docs.jsonl", "--tokenizer", "{root}/sp.model"], "SentencePiece"),
}


def train_tokenizer(path, special_tokens):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(ALL_DOCS, trainer=trainer)
    tokenizer.save(str(path))
    return tokenizer


def write_jsonl(path):
    """JSONL_DOCS, with 4 malformed lines (the first on line 3) and a blank line among them."""
    lines = [json.dumps({"text": JSONL_DOCS[0], "id": 1}), json.dumps({"text": JSONL_DOCS[1]}),
             '{"text": "torn', "", json.dumps({"body": "no text key"}), json.dumps({"text": JSONL_DOCS[2]}),
             json.dumps({"text": 42}), json.dumps(["a list"])]
    lines += [json.dumps({"text": doc}) for doc in JSONL_DOCS[3:]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    write_jsonl(root / "docs.jsonl")
    (root / "docs.txt").write_text("\n\n\n".join(TEXT_DOCS) + "\n", encoding="utf-8")
    (root / "unusable.jsonl").write_text('{"text": 1}\nnot json\n', encoding="utf-8")
    (root / "sp.model").write_bytes(b"not a model")
    tokenizer = train_tokenizer(root / "tokenizer.json", [EOD])
    train_tokenizer(root / "no-eod.json", [])
    return root, tokenizer


def both_inputs(root, tokenizer="tokenizer.json"):
    return ["--input", root / "docs.jsonl", root / "docs.txt", "--tokenizer", root / tokenizer]


def run_concurrently(arguments):
    """{name: CompletedProcess} of the tool run with each argument list, side by side."""
    started = {name: subprocess.Popen([sys.executable, str(TOOL), *map(str, args)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
               for name, args in arguments.items()}
    results = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """name -> (CompletedProcess, output directory) of the command-line runs.

    w1 / w2: both inputs with 1 and 2 workers, EOD appended; unusable: a jsonl with no usable line.
    """
    root, _ = inputs
    arguments = {
        "w1": [*both_inputs(root), "--append-eod", "--workers", 1],
        "w2": [*both_inputs(root), "--append-eod", "--workers", 2],
        "unusable": ["--input", root / "unusable.jsonl", "--tokenizer", root / "tokenizer.json"],
    }
    out_dirs = {name: tmp_path_factory.mktemp(name) for name in arguments}
    results = run_concurrently({name: [*args, "--output-prefix", out_dirs[name] / "ds"]
                                for name, args in arguments.items()})
    return {name: (results[name], out_dirs[name]) for name in arguments}


@pytest.fixture(scope="module")
def tool():
    yield from imported_tool(TOOL, "preprocess_data_tool")


def run_main(tool, capsys, args):
    """(exit status, stdout, stderr) of the tool's main() in this process."""
    try:
        status = tool.main([str(a) for a in args])
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def output_of(runs, name):
    result, out = runs[name]
    assert result.returncode == 0, result.stderr
    return IndexedDataset(out / "ds")


def assert_one_line_error(status, stderr, out, expected_status, message):
    assert status == expected_status, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("preprocess_data: error: "), stderr
    assert message in lines[0]
    assert list(out.iterdir()) == []


def test_output_decodes_back_to_the_documents_in_order(inputs, runs):
    _, tokenizer = inputs
    eod_id = tokenizer.token_to_id(EOD)
    dataset = output_of(runs, "w1")
    assert len(dataset) == len(ALL_DOCS)
    assert dataset.document_indices.tolist() == list(range(len(ALL_DOCS) + 1))
    for i, doc in enumerate(ALL_DOCS):
        ids = dataset[i].tolist()
        assert ids[-1] == eod_id and tokenizer.decode(ids[:-1]) == doc


def test_reports_skipped_lines_and_a_summary(runs):
    result, _ = runs["w1"]
    stderr = result.stderr.strip().splitlines()
    assert len(stderr) == 1
    assert "skipped 4 malformed lines (first: " in stderr[0] and "docs.jsonl:3: bad JSON" in stderr[0]
    summary = result.stdout.strip()
    assert f"{len(ALL_DOCS):,} documents" in summary and "tokens/s" in summary


def test_output_does_not_depend_on_the_number_of_workers(runs):
    (_, one), (_, two) = runs["w1"], runs["w2"]
    output_of(runs, "w2")
    for suffix in (".bin", ".idx"):
        assert (one / f"ds{suffix}").read_bytes() == (two / f"ds{suffix}").read_bytes()
    assert sorted(p.name for p in two.iterdir()) == ["ds.bin", "ds.idx"]  # no temporary file left


def test_no_usable_document_fails_without_writing(runs):
    result, out = runs["unusable"]
    assert_one_line_error(result.returncode, result.stderr, out, 1, "no usable document")
    assert "skipped 2 malformed lines" in result.stderr


def test_eod_only_when_asked(tool, inputs, runs, tmp_path, capsys):
    status, _, err = run_main(tool, capsys, [*both_inputs(inputs[0]), "--output-prefix", tmp_path / "plain"])
    assert status == 0, err
    with_eod, without = output_of(runs, "w1"), IndexedDataset(tmp_path / "plain")
    assert len(without) == len(with_eod)
    assert all(without[i].tolist() == with_eod[i].tolist()[:-1] for i in range(len(without)))


def test_eod_id_option(tool, inputs, tmp_path, capsys):
    args = [*both_inputs(inputs[0], "no-eod.json"), "--append-eod", "--eod-id", 7, "--output-prefix", tmp_path / "ds"]
    status, _, err = run_main(tool, capsys, args)
    assert status == 0, err
    dataset = IndexedDataset(tmp_path / "ds")
    assert len(dataset) == len(ALL_DOCS)
    assert all(dataset[i][-1] == 7 for i in range(len(dataset)))


@pytest.mark.parametrize("name", BAD_ARGUMENTS)
def test_bad_arguments_are_one_line_and_write_nothing(tool, inputs, tmp_path, capsys, name):
    arguments, message = BAD_ARGUMENTS[name]
    arguments = [argument.format(root=inputs[0]) for argument in arguments]
    status, out, err = run_main(tool, capsys, [*arguments, "--output-prefix", tmp_path / "ds"])
    assert out == ""
    assert_one_line_error(status, err, tmp_path, 2, message)


def test_output_prefix_under_a_file_is_one_line(tool, inputs, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    status, out, err = run_main(tool, capsys, [*both_inputs(inputs[0]), "--output-prefix", tmp_path / "a-file" / "sub" / "ds"])
    assert status == 2 and err.strip().splitlines() == [f"preprocess_data: error: --output-prefix: {tmp_path / 'a-file'} "
                                                        "is a file, not a directory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_an_existing_output_is_replaced_only_by_a_complete_one(tool, inputs, tmp_path, capsys):
    root = inputs[0]
    status, _, err = run_main(tool, capsys, ["--input", root / "docs.txt", "--tokenizer", root / "tokenizer.json",
                                             "--output-prefix", tmp_path / "ds"])
    assert status == 0, err
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    status, _, err = run_main(tool, capsys, ["--input", root / "unusable.jsonl", "--tokenizer",
                                             root / "tokenizer.json", "--output-prefix", tmp_path / "ds"])
    assert status == 1 and "no usable document" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # the failed run kept the old one
    status, _, err = run_main(tool, capsys, [*both_inputs(root), "--output-prefix", tmp_path / "ds"])
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]
    assert len(IndexedDataset(tmp_path / "ds")) == len(ALL_DOCS)


def test_ctrl_c_leaves_nothing_and_says_so(tool, inputs, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(tool.IndexedDatasetWriter, "add_document", interrupted)
    status, out, err = run_main(tool, capsys, [*both_inputs(inputs[0]), "--output-prefix", tmp_path / "ds"])
    assert status == 130 and err.strip().splitlines() == ["preprocess_data: error: interrupted; no output written"]
    assert list(tmp_path.iterdir()) == []
