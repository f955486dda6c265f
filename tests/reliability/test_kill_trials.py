"""Random interruptions of one run, resumed each time with the same command, then to the end: the
per-step losses and eval losses must equal an uninterrupted run's exactly (float equality).

Each trial starts (or resumes) the run, waits a random moment past its first new checkpoint, and
strikes with one of: kill -9 during synchronous saves, kill -9 during background (async) saves,
SIGTERM (save and exit 0), or Ctrl-C twice in quick succession (the second abandons the stop's save:
one line, exit 130, or exit 0 when the save finished first). The run saves every step, so a good
share of the moments land inside a save. After every trial: `latest` names a complete checkpoint
that the next start resumes from, metrics.jsonl holds no step twice once resumed, nothing
temporary survives the next save, and no trial printed a traceback.

MEGACPM_KILL_TRIALS sets the number of trials (CI: 4, one of each strike; the acceptance run: 20).
"""
import os
import random
import signal
import time

import pytest

from megacpm.checkpoint import CheckpointError, checkpoint_problem, latest_checkpoint
from megacpm.io.run_dir import read_metrics
from tests.reliability.hostile import temporaries
from tests.support import start_cli
from tests.train.test_training_run import SMALL, eval_losses, losses, train

pytestmark = pytest.mark.slow

TRIALS = int(os.environ.get("MEGACPM_KILL_TRIALS", "4"))
STEPS = max(48, 12 * TRIALS)  # room for every trial's steps (a few to a dozen each)
COMMON = [f"--train.steps={STEPS}", "--train.log_interval=1", "--checkpoint.interval=1", "--checkpoint.keep=2",
          "--train.eval_interval=10", "--schedule.warmup_steps=10"]
STRIKES = ("kill9-sync", "kill9-async", "sigterm", "double-ctrl-c")


def strike(run_dir, data_cache, kind, rng, timeout=240):
    """Start the run, wait for a checkpoint newer than the one it resumed from plus a random
    moment, strike; (returncode, stderr)."""
    before = latest_checkpoint(run_dir)
    start_step = int(before.name.split("_")[1]) if before else 0
    async_save = "true" if kind == "kill9-async" else "false"
    proc = start_cli("train", "tiny", f"--run.dir={run_dir}", f"--data.cache_dir={data_cache}", *SMALL, *COMMON,
                     f"--checkpoint.async_save={async_save}")
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:  # read while the run writes: a listing can race a rename of the rotation
                latest = latest_checkpoint(run_dir)
            except CheckpointError:
                latest = None
            if latest is not None and int(latest.name.split("_")[1]) > start_step:
                break
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"{kind}: the run ended (status {proc.returncode}) before a new checkpoint:\n{err}")
            assert time.monotonic() < deadline, f"{kind}: no new checkpoint within {timeout} s"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.6))
        if kind.startswith("kill9"):
            proc.send_signal(signal.SIGKILL)
        elif kind == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGINT)
            time.sleep(rng.uniform(0.0, 0.05))
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def test_random_interruptions_resume_exactly(tmp_path, data_cache):
    reference = tmp_path / "reference"
    train(reference, data_cache, *COMMON)

    run_dir = tmp_path / "run"
    rng = random.Random(int(os.environ.get("MEGACPM_KILL_SEED", "2026")))
    report = []
    for trial in range(TRIALS):
        kind = STRIKES[trial % len(STRIKES)]
        code, err = strike(run_dir, data_cache, kind, rng)
        assert "Traceback" not in err, f"trial {trial} ({kind}):\n{err}"
        errors = [line for line in err.splitlines() if line.startswith("megacpm: error:")]
        if kind.startswith("kill9"):
            assert code == -signal.SIGKILL, (kind, code, err)
        elif kind == "sigterm":
            assert code == 0 and not errors, (kind, code, err)
        else:
            # 130 and one line: the second Ctrl-C abandoned the stop's save; 0: the save finished
            # first; -SIGINT and silence: it struck the interpreter's shutdown after a clean stop.
            assert (code, len(errors)) in ((0, 0), (130, 1), (-signal.SIGINT, 0)), (kind, code, err)
        latest = latest_checkpoint(run_dir)
        assert latest is not None and checkpoint_problem(latest) is None, (trial, kind, latest)
        if not kind.startswith("kill9"):  # a clean exit leaves nothing temporary behind
            assert not temporaries(run_dir), (trial, kind, temporaries(run_dir))
        steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
        report.append((kind, code, latest.name, max(steps)))
        if int(latest.name.split("_")[1]) >= STEPS - 10:
            break  # close to the end: leave the last steps to the final resume
    print("trials (strike, exit code, latest, last logged step):", *report, sep="\n  ")

    result = train(run_dir, data_cache, *COMMON)  # resume to the end with the same command
    assert "resumed from" in result.stdout
    assert not temporaries(run_dir)
    assert losses(run_dir) == losses(reference)
    logged = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert logged == list(range(1, STEPS + 1))  # each step once, in order: truncated at every resume
    assert eval_losses(run_dir) == eval_losses(reference)
    assert len(report) >= min(TRIALS, 4), report
