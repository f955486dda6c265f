"""The run directory under hostile hands: a lost or scribbled-over ``latest``, a hand-rolled-back
``latest``, a resume the run cannot take, damaged state files, a full or read-only disk, and a second
trainer on a live run. Each row runs the real CLI on a copy of one small trained run (steps 1-4,
checkpoints step_2..step_4) and checks the promise of docs/reliability.md that applies: one line and
the directory byte-identical, or a recovery with one warning and the invariants afterwards (``latest``
loadable, metrics.jsonl holding each step once, nothing temporary left).
"""
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from megacpm.checkpoint import checkpoint_problem, latest_checkpoint
from megacpm.io.run_dir import read_metrics
from tests.reliability.hostile import Hostile, assert_one_line, run_command, run_hostile, snapshot, temporaries
from megacpm.io.run_lock import RunLock
from tests.support import run_torchrun, start_cli
from tests.train.test_training_run import SMALL

pytestmark = pytest.mark.slow

BASE_STEPS = 4
TRAIN = ["--log.progress=false", "--train.log_interval=1", "--checkpoint.interval=1", "--checkpoint.keep=3",
         "--train.eval_interval=1000"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_cache):
    """A finished 4-step run: checkpoints step_2, step_3, step_4 and `latest` -> step_4."""
    run = tmp_path_factory.mktemp("reliability") / "base"
    out = run_command(["megacpm", "train", "tiny", f"--run.dir={run}", f"--data.cache_dir={data_cache}", *SMALL,
                       *TRAIN, f"--train.steps={BASE_STEPS}"], run.parent)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_2", "step_3", "step_4"]
    return run


def steps_logged(run):
    return [r["step"] for r in read_metrics(run) if "loss" in r]


def loss_at(run, step):
    return next(r["loss"] for r in read_metrics(run) if r.get("step") == step and "loss" in r)


def copy_of(base):
    def setup(directory: Path) -> None:
        shutil.copytree(base, directory / "run")
    return setup


def then(*steps):
    def setup_chain(base):
        def setup(directory):
            copy_of(base)(directory)
            for step in steps:
                step(directory / "run")
        return setup
    return setup_chain


def remove_latest(run):
    (run / "checkpoints" / "latest").unlink()


def scribble_latest(run):
    (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00\x9c garbage \x00")


def roll_back_to_2(run):
    (run / "checkpoints" / "latest").write_text("step_2")


def keep_only_latest(run):
    for name in ("step_2", "step_3"):
        shutil.rmtree(run / "checkpoints" / name)


def state_file_binary(run):
    (run / "checkpoints" / "step_4" / "trainer_state.json").write_bytes(b"\x80\x81\x82 not json")


def state_file_list(run):
    (run / "checkpoints" / "step_4" / "trainer_state.json").write_text("[1, 2]")


def state_file_missing_field(run):
    path = run / "checkpoints" / "step_4" / "trainer_state.json"
    meta = json.loads(path.read_text())
    del meta["consumed_samples"]
    path.write_text(json.dumps(meta))


def rng_file_wrong_shape(run):
    (run / "checkpoints" / "step_4" / "rng" / "rank_0.json").write_text('{"python": 3}')


def shard_truncated(run):
    shard = next((run / "checkpoints" / "step_4" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])


def checkpoints_is_a_file(run):
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a directory")


def resumed(from_step, to_step, warning):
    """The recovery's invariants: the one warning said, the run continued from ``from_step`` to
    ``to_step``, metrics hold each step once with the steps before ``from_step`` untouched."""
    def check(directory, before):
        run = directory / "run"
        latest = latest_checkpoint(run)
        assert latest is not None and latest.name == f"step_{to_step}", latest
        assert checkpoint_problem(latest) is None
        assert steps_logged(run) == list(range(1, to_step + 1)), steps_logged(run)
        for name in os.listdir(run / "checkpoints"):  # rotation kept the newest three, the new ones
            assert name == "latest" or int(name.split("_")[1]) > to_step - 3, sorted(os.listdir(run / "checkpoints"))
    return check


def rows(base, data_cache):
    train_more = ["megacpm", "train", "{dir}/run", "--train.steps=6"]
    return [
        # -- `latest` lost or unreadable: the newest complete checkpoint, found by scanning -----------
        Hostile("latest deleted", train_more, r"latest is missing: resuming from step_4",
                setup=then(remove_latest)(base), check=resumed(4, 6, "missing"), ok=True),
        Hostile("latest binary bytes", train_more, r"latest is unreadable.*resuming from step_4",
                setup=then(scribble_latest)(base), check=resumed(4, 6, "unreadable"), ok=True),
        Hostile("latest names a corrupt checkpoint", train_more,
                r"names step_4, which is incomplete .*resuming from step_3",
                setup=then(state_file_list)(base), check=resumed(3, 6, "incomplete"), ok=True),
        # -- no complete checkpoint left: refused, not restarted from step 1 over the run's metrics ---
        Hostile("only checkpoint: state file not UTF-8", train_more,
                r"trainer_state.json: not UTF-8.*no complete checkpoint is left",
                setup=then(keep_only_latest, state_file_binary)(base)),
        Hostile("only checkpoint: state file missing a field", train_more,
                r"field 'consumed_samples' is None.*no complete checkpoint is left",
                setup=then(keep_only_latest, state_file_missing_field)(base)),
        Hostile("only checkpoint: DCP shard truncated", train_more,
                r"\.distcp: truncated \(100 of \d+ bytes\).*no complete checkpoint",
                setup=then(keep_only_latest, shard_truncated)(base)),
        Hostile("RNG state of the wrong shape", train_more, r"rng/rank_0.json: corrupted",
                setup=then(rng_file_wrong_shape)(base)),
        Hostile("checkpoints is a file", train_more, r"checkpoints: a file, not the run's checkpoints directory",
                setup=then(checkpoints_is_a_file)(base)),
        # -- a resume the run cannot take: refused before config.yaml (or anything) is rewritten -------
        Hostile("changed model shape", [*train_more, "--model.num_hidden_layers=3"],
                r"model.num_hidden_layers is 2 in the checkpoint but 3 in the config", setup=copy_of(base)),
        Hostile("another config at an existing run.dir",
                ["megacpm", "train", "tiny", "--run.dir={dir}/run", f"--data.cache_dir={data_cache}", *SMALL,
                 "--model.hidden_size=32",
                 "--model.intermediate_size=64"],
                r"model.hidden_size is 64 in the checkpoint but 32", setup=copy_of(base)),
        # -- the disk fails ----------------------------------------------------------------------------
        Hostile("read-only run directory", ["faulty", "EROFS", "{dir}/run", "--", *train_more],
                r"run/\.lock: read-only file system", setup=copy_of(base)),
        Hostile("disk full at a checkpoint", ["faulty", "ENOSPC", ".tmp-step_5", "--", *train_more],
                r"saving step_5: .*no space left on device", setup=copy_of(base),
                check=lambda d, before: _latest_is(d / "run", 4)),
        Hostile("disk full at the metrics", ["faulty", "ENOSPC", "metrics.jsonl", "--", *train_more],
                r"metrics.jsonl: no space left on device", setup=copy_of(base), check=metrics_intact),
    ]


def metrics_intact(directory, before):
    run = directory / "run"
    assert steps_logged(run) == list(range(1, BASE_STEPS + 1))
    _latest_is(run, BASE_STEPS)
    assert before["run/metrics.jsonl"] == snapshot(run.parent)["run/metrics.jsonl"]


def _latest_is(run, step):
    latest = latest_checkpoint(run)
    assert latest.name == f"step_{step}" and checkpoint_problem(latest) is None


CASES = [row.name for row in rows(Path("unused"), None)]


@pytest.mark.parametrize("name", CASES)
def test_hostile_run_directory(name, base_run, tmp_path, data_cache):
    (case,) = [row for row in rows(base_run, data_cache) if row.name == name]
    run_hostile(case, tmp_path)


def test_rolled_back_latest_replaces_the_stale_checkpoints(base_run, tmp_path):
    """`latest` rolled back to step_2 by hand, training continued with another LR: steps 3-4 are
    trained again and saved over the stale step_3, step_4 (not "saved already"), the metrics hold
    the new losses once, and rotation never removed the new checkpoints."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    roll_back_to_2(run)
    old_loss_4 = loss_at(run, 4)
    out = run_command(["megacpm", "train", str(run), "--optim.lr=0.002"], tmp_path)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "step_3, step_4 are newer" in out.stderr and "resuming from step_2" in out.stderr, out.stderr
    assert latest_checkpoint(run).name == "step_4"
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_2", "step_3", "step_4"]
    for name in ("step_3", "step_4"):  # the replacements carry the new run's config
        assert "lr: 0.002" in (run / "checkpoints" / name / "config.yaml").read_text()
    assert steps_logged(run) == [1, 2, 3, 4]
    assert loss_at(run, 4) != old_loss_4  # the new trajectory's loss, not the old one's
    assert not temporaries(run)


def test_second_trainer_is_refused_while_the_first_runs_on(base_run, tmp_path, data_cache):
    run = tmp_path / "run"
    first = start_cli("train", "tiny", f"--run.dir={run}", f"--data.cache_dir={data_cache}", *SMALL, *TRAIN,
                      "--train.steps=400")
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(run) is None:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        second = run_command(["megacpm", "train", str(run)], tmp_path)
        line = assert_one_line(second, r"in use by another trainer \(pid \d+ on .* since .*\)", "second trainer")
        assert str(first.pid) in line
        assert first.poll() is None  # the first one trains on, its checkpoints untouched
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    latest = latest_checkpoint(run)
    assert checkpoint_problem(latest) is None and not temporaries(run)
    step = int(latest.name.split("_")[1])
    assert steps_logged(run) == list(range(1, step + 1))
    # The lock went with its holder: the run resumes at once.
    again = run_command(["megacpm", "train", str(run), f"--train.steps={step + 1}"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert steps_logged(run) == list(range(1, step + 2))


def test_a_torchrun_job_shares_one_lock_and_is_refused_as_one(base_run, tmp_path):
    """A 2-rank torchrun job on a run whose lock another process holds: rank 0 says so in one line,
    rank 1 leaves quietly (the failure was rank 0's, shared), and the run is byte-identical."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = snapshot(tmp_path)
    with RunLock(run):  # the live trainer, as far as the job can tell
        result = run_torchrun(2, "train", str(run), "--train.steps=6")
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("megacpm: error:")]
    assert len(ours) == 1 and "in use by another trainer" in ours[0], result.stderr[-3000:]
    # torchrun prints its own ChildFailedError traceback; none may come from inside megacpm
    frames = [line for line in result.stderr.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if "/megacpm/" in f and "torch" not in f], result.stderr[-3000:]
    assert snapshot(tmp_path) == before
