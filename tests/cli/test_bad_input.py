"""Bad input as a user meets it: the real CLI in a subprocess, one line naming the problem, no files."""
import pytest

from tests.support import run_cli


@pytest.mark.parametrize("override, key", [
    ("--train.bogus=1", "train.bogus"),
    ("--train.steps=many", "train.steps"),
    ("--model.num_attention_heads=5", "model.num_attention_heads"),
    ("--train.steps=-3", "train.steps"),
    ("--data.source=text", "data.path"),
])
def test_bad_train_input_is_one_line_and_writes_nothing(tmp_path, override, key):
    run_dir = tmp_path / "run"
    extra = ["--data.path=" + str(tmp_path / "missing.txt")] if override == "--data.source=text" else []
    result = run_cli("train", "tiny", f"--run.dir={run_dir}", override, *extra, cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert key in lines[0]
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_data_path_names_the_path(tmp_path):
    missing = tmp_path / "corpus.txt"
    result = run_cli("train", "tiny", f"--run.dir={tmp_path / 'run'}", "--data.source=text",
                     f"--data.path={missing}", cwd=tmp_path)
    assert result.returncode != 0
    assert "data.path" in result.stderr and str(missing) in result.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_config_names_the_presets(tmp_path):
    result = run_cli("train", "no-such-model", cwd=tmp_path)
    assert result.returncode != 0
    assert "no-such-model" in result.stderr and "tiny" in result.stderr
    assert "Traceback" not in result.stderr
