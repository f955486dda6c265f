"""`megacpm sft` / `megacpm dpo`: `megacpm train` with objective.kind forced, checked in-process with a
recording Trainer (nothing trains, nothing is written outside tmp_path)."""
from pathlib import Path
from types import SimpleNamespace

import pytest

from megacpm.cli import EXIT_USAGE, main, training_config


@pytest.fixture
def trained(monkeypatch, tmp_path):
    """The configs `megacpm train/sft/dpo` would have trained; the demo's chat files exist under
    tmp_path (the working directory), so the tiny presets validate."""
    from megacpm.train import trainer

    monkeypatch.chdir(tmp_path)
    demo = tmp_path / "data" / "chat-demo"
    demo.mkdir(parents=True)
    (demo / "sft.jsonl").write_text('{"prompt": "hi", "response": "hello"}\n')
    (demo / "preference.jsonl").write_text('{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n')
    seen = []

    class RecordingTrainer:
        def __init__(self, cfg, **kwargs):
            seen.append(cfg)
            self.cfg, self.is_rank0 = cfg, True
            self.ctx = SimpleNamespace(destroy=lambda: None)

        def run(self):
            return trainer.RunResult("completed", self.cfg.train.steps, None, None, Path(self.cfg.run.dir))

    monkeypatch.setattr(trainer, "Trainer", RecordingTrainer)
    return seen


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, kind", [
    (["sft", "tiny-sft"], "sft"),
    (["dpo", "tiny-dpo"], "dpo"),
    (["train", "tiny-sft"], "sft"),  # train takes the kind from the config
    (["train", "tiny-dpo"], "dpo"),
    (["sft", "tiny-sft", "--objective.kind=sft"], "sft"),  # an override that agrees with the verb
    (["sft", "tiny", "--data.source=sft", "--data.path=data/chat-demo/sft.jsonl"], "sft"),  # lm takes the verb's kind
    (["dpo", "tiny-sft", "--objective.kind=dpo", "--data.source=preference", "--data.packing=false",
      "--data.path=data/chat-demo/preference.jsonl"], "dpo"),
])
def test_the_verb_sets_the_kind(trained, capsys, argv, kind):
    assert main(argv) == 0
    assert [cfg.objective.kind for cfg in trained] == [kind]
    assert capsys.readouterr().out.startswith("done: ")


def test_training_config_keeps_one_path():
    assert training_config("tiny", []).objective.kind == "lm"
    assert training_config("tiny", [], kind="dpo").objective.kind == "dpo"
    assert training_config("tiny-dpo", [], kind="dpo").objective.kind == "dpo"
    assert training_config("tiny-sft", []).objective.kind == "sft"


def test_the_other_finetuning_kind_is_a_usage_error(trained, capsys):
    assert main(["sft", "tiny-dpo"]) == EXIT_USAGE
    line = _one_error_line(capsys)
    assert "objective.kind dpo" in line and "megacpm dpo" in line and "--objective.kind=sft" in line
    assert trained == []
    assert main(["dpo", "tiny-sft"]) == EXIT_USAGE
    line = _one_error_line(capsys)
    assert "objective.kind sft" in line and "megacpm sft" in line
    assert trained == []


@pytest.mark.parametrize("argv, hint", [
    (["sft", "tiny-sft", "--objective.kind=lm"], "megacpm train"),
    (["sft", "tiny", "--objective.kind", "lm"], "megacpm train"),
    (["sft", "tiny-sft", "--objective.kind=dpo"], "megacpm dpo"),
    (["dpo", "tiny-dpo", "--objective.kind=sft"], "megacpm sft"),
])
def test_an_override_contradicting_the_verb_is_a_usage_error(trained, capsys, argv, hint):
    assert main(argv) == EXIT_USAGE
    line = _one_error_line(capsys)
    assert "--objective.kind=" in line and f"'megacpm {argv[0]}'" in line and hint in line
    assert trained == []


def test_dpo_on_a_pretraining_preset_fails_validation(trained, capsys):
    # tiny is objective.kind lm on the embedded corpus: dpo makes it a dpo config, which needs pairs.
    assert main(["dpo", "tiny"]) == EXIT_USAGE
    line = _one_error_line(capsys)
    assert "data.source" in line and "objective.kind dpo" in line and "preference" in line
    assert trained == []


def test_help_lists_the_finetuning_verbs(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("    ")]
    assert {"train", "sft", "dpo"} <= set(listed)
    for verb in ("sft", "dpo"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert f"objective.kind {verb}" in " ".join(capsys.readouterr().out.split())


def test_a_pretraining_run_directory_is_not_resumed_as_finetuning(trained, capsys, tmp_path):
    from megacpm.config import dump_yaml, load_config

    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(load_config("tiny", [f"--run.dir={run}"])))
    before = sorted(p.name for p in run.iterdir())
    assert main(["sft", str(run), "--data.source=sft", "--data.path=data/chat-demo/sft.jsonl"]) == EXIT_USAGE
    line = _one_error_line(capsys)
    assert "objective.kind lm" in line and f"--train.init_from={run}" in line
    assert trained == [] and sorted(p.name for p in run.iterdir()) == before
    assert main(["train", str(run)]) == 0  # train resumes it as it was
    assert [cfg.objective.kind for cfg in trained] == ["lm"]
