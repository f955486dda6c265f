"""Bad chat data through the CLI: one line naming the file (and line), no traceback, and nothing
written: the run directory is not created."""
import pytest

from megacpm.cli import main
from tests.chat_support import TOKENIZER_VOCAB, small_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"))[1]


def sft(tmp_path, tok_path, path, *extra):
    return ["sft", "tiny", "--data.source=sft", f"--data.path={path}", f"--data.tokenizer={tok_path}",
            f"--model.vocab_size={TOKENIZER_VOCAB}", f"--data.cache_dir={tmp_path / 'cache'}",
            f"--run.dir={tmp_path / 'run'}", "--train.steps=1", *extra]


def one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_file_without_a_usable_line(tmp_path, tok_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"prompt": "no response"}, {"messages": []}])
    assert main(sft(tmp_path, tok_path, path)) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"megacpm: error: data.path: {path}: no usable sft sample in 3 lines")
    assert "malformed JSON (line 1)" in line and "not a chat sample (lines 2, 3)" in line
    assert not (tmp_path / "run").exists()


def test_a_missing_file_is_a_config_error(tmp_path, tok_path, capsys):
    assert main(sft(tmp_path, tok_path, tmp_path / "missing.jsonl")) == 2
    line = one_error_line(capsys)
    assert "data.path" in line and "missing.jsonl" in line
    assert not (tmp_path / "run").exists()


def test_a_template_file_that_is_not_yaml(tmp_path, tok_path, capsys):
    path = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(4)])
    template = tmp_path / "template.yaml"
    template.write_text("user: {prefix: 'U'}\nassistant: [unclosed\n")
    assert main(sft(tmp_path, tok_path, path, f"--data.chat_template={template}")) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"megacpm: error: data.chat_template: {template} line ") and "not valid YAML" in line
    assert not (tmp_path / "run").exists()


def test_preference_lines_without_a_completion(tmp_path, tok_path, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "", "rejected": "r"},
                                                  {"prompt": "q", "chosen": "c", "rejected": [{"role": "user",
                                                                                             "content": "x"}]}])
    args = sft(tmp_path, tok_path, path)
    args[0], args[2] = "dpo", "--data.source=preference"
    assert main(args) == 1
    line = one_error_line(capsys)
    assert f"{path}: no usable preference sample in 2 lines (2 empty completion (lines 1, 2))" in line
    assert not (tmp_path / "run").exists()


def test_the_missing_demo_data_names_the_tool_that_writes_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh checkout: no data/chat-demo/ yet
    assert main(["sft", "tiny-sft"]) == 2
    line = one_error_line(capsys)
    assert "data/chat-demo/sft.jsonl does not exist" in line and "python tools/make_chat_data.py" in line
