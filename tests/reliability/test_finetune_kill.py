"""DPO runs killed with SIGKILL resume exactly: mid-run, during the reference precompute, and after
losing the precomputed table; a table made from other initial weights is refused on resume.

Every run is the real `megacpm train` (a subprocess where it is killed) with the same command as an
uninterrupted run, whose metrics.jsonl is the reference: every step's record (loss, gradient norm,
rewards, accuracies, margins, log-probabilities, and the eval_ records) must be equal as floats.
The model, data and tokenizer are the tiny ones of tests/parallel/test_finetune_parity.py, with
enough pairs that scoring them takes about a second (a window for the kill during the precompute).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megacpm.io.atomic import TMP_PREFIX
from megacpm.io.run_dir import REFERENCE_FILE
from tests.parallel.test_finetune_parity import overrides, write_chat_data
from tests.reliability.hostile import temporaries
from tests.support import cli_env, run_cli

pytestmark = pytest.mark.slow

STEPS = 12
PAIRS = 600  # scoring them takes ~1.5 s on this machine's two cores
COMMON = [f"--train.steps={STEPS}", "--checkpoint.interval=2", "--checkpoint.keep=0"]
SCORING = "reference (objective.reference precompute): scoring"


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("chat-data"), pairs=PAIRS)


def dpo_args(chat_data, run_dir, *extra):
    return ["train", "tiny", *overrides(chat_data, "dpo", run_dir, *COMMON, *extra)]


def train(chat_data, run_dir, *extra):
    result = run_cli(*dpo_args(chat_data, run_dir, *extra))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


def start(chat_data, run_dir, *extra):
    # Unbuffered: the test reacts to the trainer's lines as they are printed.
    return subprocess.Popen([sys.executable, "-m", "megacpm", *dpo_args(chat_data, run_dir, *extra)],
                            env=dict(cli_env(), PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def records(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def metrics(run_dir):
    """{(step, "train" | "eval"): record without its wall-clock rate}; each record once."""
    out = {}
    for record in records(run_dir):
        key = (record["step"], "train" if "loss" in record else "eval")
        assert key not in out, f"step {key} logged twice"
        out[key] = {k: v for k, v in record.items() if k != "tokens_per_sec"}
    return out


def assert_same_run(run_dir, reference):
    got, want = metrics(run_dir), metrics(reference)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], key  # float equality: the same computation, step for step


def latest_step(run_dir):
    return int((Path(run_dir) / "checkpoints" / "latest").read_text().strip().split("_")[1])


def kill_after_step(proc, run_dir, step, timeout=240):
    """SIGKILL once metrics.jsonl has the train record of ``step``; (stdout, stderr) of the run."""
    deadline = time.monotonic() + timeout
    try:
        while not any(r.get("step") == step and "loss" in r for r in records(run_dir)):
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the run ended (status {proc.returncode}) before step {step}:\n{out}\n{err}")
            assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
    return out, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, chat_data):
    """An uninterrupted run (its checkpoints step_2 .. step_12 all kept)."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = train(chat_data, run_dir)
    assert SCORING in result.stdout
    return run_dir


def test_kill9_mid_run_resumes_exactly_and_a_deleted_table_is_scored_again(tmp_path, chat_data, reference):
    run_dir = tmp_path / "run"
    table = run_dir / REFERENCE_FILE
    kill_after_step(start(chat_data, run_dir), run_dir, 3)
    first = latest_step(run_dir)
    assert first in (2, 4) and table.is_file(), first
    written = table.read_bytes()

    # (a) Resumed with the same command, again killed mid-run: the saved table is used as it is.
    out, err = kill_after_step(start(chat_data, run_dir), run_dir, first + 3)
    assert f"step_{first} (step {first})" in out and SCORING not in out, out
    assert "megacpm: warning" not in err, err
    assert table.read_bytes() == written
    second = latest_step(run_dir)
    assert second > first

    # (c) The table lost after a checkpoint: the resumed run says so in one warning line, scores
    # the pairs again with the initial weights (a frozen copy: the policy has moved) and goes on
    # exactly as the uninterrupted run did.
    table.unlink()
    result = train(chat_data, run_dir)
    warnings = [line for line in result.stderr.splitlines() if "reference" in line]
    expected = f"megacpm: warning: {table}: missing; scoring the reference again from the initial weights"
    assert warnings == [expected], result.stderr
    assert f"step_{second} (step {second})" in result.stdout and SCORING in result.stdout
    with np.load(table) as again, np.load(reference / REFERENCE_FILE) as want:
        for split in ("train", "valid"):
            assert np.array_equal(again[split], want[split]), split
    assert_same_run(run_dir, reference)
    assert [k for k, kind in sorted(metrics(run_dir)) if kind == "train"] == list(range(1, STEPS + 1))


def test_kill9_during_the_reference_precompute_leaves_nothing_that_breaks_the_run(tmp_path, chat_data, reference):
    run_dir = tmp_path / "run"
    proc = start(chat_data, run_dir)
    try:
        for line in proc.stdout:  # SIGKILL as soon as the scoring begins
            if line.startswith(SCORING):
                proc.send_signal(signal.SIGKILL)
                break
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
    # Killed inside the scoring: no table (whole or partial), no step, no checkpoint, nothing temporary.
    assert not (run_dir / REFERENCE_FILE).exists(), "the kill came after the table was written: more pairs"
    assert not (run_dir / "checkpoints").exists() and not records(run_dir)
    assert temporaries(run_dir) == []

    # What a kill inside the table's write could leave: its temporary file, and (from a writer that
    # is not atomic, or a damaged disk) a truncated table under the final name. Neither may matter.
    whole = (reference / REFERENCE_FILE).read_bytes()
    stale = run_dir / f"{TMP_PREFIX}{REFERENCE_FILE}.{os.getpid()}"
    stale.write_bytes(whole[:len(whole) // 2])
    (run_dir / REFERENCE_FILE).write_bytes(whole[:len(whole) // 2])
    result = train(chat_data, run_dir)
    assert SCORING in result.stdout and "resumed" not in result.stdout
    assert (run_dir / REFERENCE_FILE).read_bytes() == whole  # scored again: the same table, byte for byte
    assert_same_run(run_dir, reference)


def test_changed_init_from_weights_on_resume_is_one_clear_error(tmp_path, chat_data, reference, capsys):
    """The table was scored from train.init_from's weights; those files changed before the resume:
    one error line (a CheckpointError), exit 1, and the table stays as it was."""
    from megacpm.cli import main

    source = tmp_path / "init"
    shutil.copytree(reference / "checkpoints" / "step_2", source)
    run_dir = tmp_path / "run"
    first = ["train", "tiny", *overrides(chat_data, "dpo", run_dir, "--checkpoint.interval=2",
                                         f"--train.init_from={source}")]
    rng = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    threads = torch.get_num_threads()
    try:  # in this process (no subprocess start-up): put back what a run sets (RNG states, threads)
        assert main([*first, "--train.steps=2"]) == 0
        assert (run_dir / REFERENCE_FILE).is_file()
        table = (run_dir / REFERENCE_FILE).read_bytes()
        shutil.rmtree(source)
        shutil.copytree(reference / "checkpoints" / "step_4", source)  # other weights at the same path
        before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
        capsys.readouterr()
        assert main([*first, "--train.steps=4"]) == 1
    finally:
        random.setstate(rng[0]), np.random.set_state(rng[1]), torch.random.set_rng_state(rng[2])
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"megacpm: error: {run_dir / REFERENCE_FILE}: the reference scores were computed "
                               f"from other initial weights than train.init_from {source}"), lines
    assert f"delete {REFERENCE_FILE}" in lines[0]
    assert (run_dir / REFERENCE_FILE).read_bytes() == table
    assert latest_step(run_dir) == 2 and max(r["step"] for r in records(run_dir)) == 2
    assert (run_dir / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    assert (run_dir / "config.yaml").read_bytes() == before["config.yaml"]  # a rejected start writes nothing


def test_a_branch_takes_the_parent_table_and_does_not_score_again(tmp_path, chat_data, reference):
    branch = tmp_path / "branch"
    result = run_cli("branch", reference / "checkpoints" / "step_8", branch)
    assert result.returncode == 0, result.stderr
    assert (branch / REFERENCE_FILE).read_bytes() == (reference / REFERENCE_FILE).read_bytes()
    out = train(chat_data, branch).stdout
    assert SCORING not in out, out
    want = {key: value for key, value in metrics(reference).items() if key[0] > 8}
    got = {key: value for key, value in metrics(branch).items() if key[0] > 8}
    assert got == want  # the branch continues the parent's run exactly
