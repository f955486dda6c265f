"""`megacpm branch` / `megacpm runs` through the CLI: a branch continues its parent's weights and data
with its own schedule, leaves the parent byte-identical, and outlives the parent's rotation."""
import hashlib
import json

import pytest

from megacpm.checkpoint import CheckpointError
from megacpm.checkpoint.branch import check_branch_shape, find_runs, format_tree
from tests.support import run_cli
from tests.train.test_training_run import SMALL, losses

PARENT = [*SMALL, "--schedule.kind=constant", "--schedule.warmup_steps=0", "--checkpoint.interval=2", "--checkpoint.keep=2",
          "--train.log_interval=1", "--train.eval_interval=100"]


def tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def train(*args):
    result = run_cli("train", *args)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_branch_decays_from_a_stable_checkpoint(tmp_path, data_cache):
    parent, branch = tmp_path / "stable", tmp_path / "decay-from-4"
    train("tiny", f"--run.dir={parent}", f"--data.cache_dir={data_cache}", "--train.steps=6", *PARENT)
    before = tree_digest(parent)

    result = run_cli("branch", parent / "checkpoints" / "step_4", branch, "--train.steps=8",
                     "--schedule.kind=wsd", "--schedule.decay_start=5", "--schedule.decay=exp",
                     "--schedule.half_life=1")
    assert result.returncode == 0, result.stderr
    assert tree_digest(parent) == before  # the parent is only read
    lineage = json.loads((branch / "lineage.json").read_text())
    assert lineage["step"] == 4 and lineage["parent_checkpoint"].endswith("step_4")

    # The parent goes on and rotates step_4 away; the branch keeps its own links to those files.
    train("tiny", f"--run.dir={parent}", f"--data.cache_dir={data_cache}", "--train.steps=10", *PARENT)
    assert not (parent / "checkpoints" / "step_4").exists()

    result = train(str(branch))
    assert "from step 5" in result.stdout
    branch_losses, parent_losses = losses(branch), losses(parent)
    assert sorted(branch_losses) == [5, 6, 7, 8]
    # Step 5 is computed from the parent's step-4 weights on the parent's 5th batch; its update is at
    # the peak LR in both (the decay's t = 0), so step 6 matches too. Step 6's update is at half the
    # LR (a half-life of one step): from step 7 on the runs differ.
    assert branch_losses[5] == parent_losses[5] and branch_losses[6] == parent_losses[6]
    assert branch_losses[7] != parent_losses[7]
    records = [json.loads(line) for line in (branch / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert (lrs[5], lrs[6], lrs[7]) == pytest.approx((0.01, 0.005, 0.0025))

    result = run_cli("runs", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("stable  (step 10") and "decay-from-4  (step 8" in lines[1]
    assert "branched at step 4" in lines[1] and lines[1].startswith("└── ")


def test_branch_refuses_bad_sources_with_one_line(tmp_path):
    result = run_cli("branch", tmp_path / "nothing", tmp_path / "b")
    assert result.returncode == 1 and "neither a run directory" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "b").exists()


SAVED_SHAPE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 101, "tie_word_embeddings": True}


@pytest.mark.parametrize("key, new", [("hidden_size", 128), ("intermediate_size", 100), ("num_hidden_layers", 4),
                                      ("num_attention_heads", 8), ("num_key_value_heads", 4)])
def test_a_branch_cannot_change_the_model_shape(tmp_path, key, new):
    config_yaml = json.dumps({"model": {**SAVED_SHAPE, key: new}, "optim": {"lr": 0.001}})  # JSON is YAML
    with pytest.raises(CheckpointError) as info:
        check_branch_shape(tmp_path / "step_4", {"model": SAVED_SHAPE}, config_yaml, [f"--model.{key}={new}"])
    message = str(info.value)
    assert message.startswith(f"--model.{key}={new}: ") and f"model.{key} = {SAVED_SHAPE[key]!r}" in message
    assert f"asks for {new!r}" in message and "\n" not in message


def test_a_branch_may_change_what_branching_is_for(tmp_path):
    config_yaml = json.dumps({"model": {**SAVED_SHAPE, "scale_emb": 10.0, "dropout": 0.1},
                              "optim": {"lr": 0.001}, "schedule": {"kind": "wsd"}, "train": {"steps": 99},
                              "data": {"mixture": {"/a": 0.5, "/b": 0.5}}})
    check_branch_shape(tmp_path / "step_4", {"model": SAVED_SHAPE}, config_yaml, ["--optim.lr=0.001"])


@pytest.mark.parametrize("content, reason", [
    (b'{"parent_run": "/x", "st', "not valid JSON"), (b"\xff\xfe\x00", "not UTF-8"),
    (b'"a string"', "a JSON str, not an object"), (b'{"parent_run": "/x"}', "no integer step"),
    (b'{"step": 2}', "no parent_run"),
])
def test_runs_lists_a_run_whose_lineage_is_unreadable(tmp_path, content, reason):
    for name in ("parent", "child"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("run: {}\n")
    (tmp_path / "child" / "lineage.json").write_bytes(content)
    (tmp_path / "child" / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 3.0}\n\xff\n[1]\n{"step": 2, "loss": 2.0}\n')
    lines = format_tree(tmp_path, find_runs(tmp_path)).splitlines()
    assert lines[0].startswith("child  (no checkpoint, loss 2.0000, lineage unreadable: ") and reason in lines[0]
    assert lines[1] == "parent  (no checkpoint)"
