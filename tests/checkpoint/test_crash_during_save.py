"""kill -9 in the middle of a checkpoint save: ``checkpoints/latest`` still names a complete checkpoint
that loads, and resuming reproduces the uninterrupted run's loss at every step.

The run saves after every step (checkpoint.interval=1), so a save is under way a good part of the
time. Each attempt starts (or resumes) the run with the same command, waits for the save directory
``checkpoints/.tmp-step_N`` of a chosen step to appear and sends SIGKILL at once, or a few
milliseconds later to strike later phases of the save (the DCP write, the fsyncs, the rename, the
``latest`` rewrite, the rotation of old checkpoints).

After death, a ``.tmp-`` entry left in checkpoints/ (the ``.tmp-step_N`` directory, or the
temporary file of the ``latest`` rewrite) proves that the kill landed inside a save: the next save
removes such leftovers, so it can only be this one's. Every attempt must satisfy the invariants
wherever its kill landed, and at least one must have landed inside a save (the first, killed at
once, practically always does: a save's directory lives ~25 ms on 2 cores and is polled every
0.5 ms). The run is then resumed to the end and compared with an uninterrupted one.
"""
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

from megacpm.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from megacpm.io.atomic import TMP_PREFIX
from megacpm.config import load_config
from megacpm.parallel.context import ParallelContext
from megacpm.train.train_module import TrainModule
from tests.support import start_cli
from tests.train.test_training_run import SMALL, eval_losses, losses, train

pytestmark = pytest.mark.slow

STEPS = 24
COMMON = [f"--train.steps={STEPS}", "--train.log_interval=1", "--checkpoint.interval=1", "--checkpoint.keep=2",
          "--schedule.warmup_steps=4"]
# (step N, event, seconds to wait after it before the kill). "saving": .tmp-step_N appeared (the
# delays reach later phases of the save: rng files, the DCP write, metadata and fsyncs); "renamed":
# step_N appeared under its final name, so the kill strikes the `latest` rewrite, the rotation or the
# next step, and a complete step_N may be left that `latest` does not name yet.
ATTEMPTS = [(4, "saving", 0.0), (10, "saving", 0.010), (15, "saving", 0.025), (20, "renamed", 0.0)]
POLL_S = 0.0005


def tmp_entries(checkpoints):
    return sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(TMP_PREFIX)) if checkpoints.is_dir() else []


def newest(checkpoints, prefix):
    """The highest N of the entries named prefix + "step_N" in checkpoints/ now, or None."""
    try:
        names = os.listdir(checkpoints)
    except FileNotFoundError:
        return None
    start = prefix + "step_"
    return max((int(n[len(start):]) for n in names if n.startswith(start) and n[len(start):].isdigit()), default=None)


def kill_at(run_dir, data_cache, at_least, event, delay, timeout=120):
    """Start the run and SIGKILL it once ``event`` happens for a step >= at_least; that step."""
    checkpoints = run_dir / "checkpoints"
    prefix = {"saving": TMP_PREFIX, "renamed": ""}[event]
    proc = start_cli("train", "tiny", f"--run.dir={run_dir}", f"--data.cache_dir={data_cache}", *SMALL, *COMMON)
    deadline = time.monotonic() + timeout
    try:
        while True:
            step = newest(checkpoints, prefix)
            if step is not None and step >= at_least:
                if delay:
                    time.sleep(delay)
                os.kill(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the run ended (status {proc.returncode}) before step {at_least} was {event}:\n{out}\n{err}")
            assert time.monotonic() < deadline, f"step {at_least} not {event} within {timeout} s"
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return step


def assert_latest_loads(run_dir):
    """``latest`` names a complete checkpoint, and it loads (in this process); its step."""
    checkpoints = run_dir / "checkpoints"
    name = (checkpoints / "latest").read_text().strip()
    path = checkpoints / name
    assert name.startswith("step_") and path.is_dir(), f"latest names {name!r}: {sorted(os.listdir(checkpoints))}"
    assert (path / "trainer_state.json").is_file() and (path / "state" / ".metadata").is_file(), sorted(
        str(p.relative_to(path)) for p in path.rglob("*"))
    assert latest_checkpoint(run_dir) == path
    cfg = load_config(str(run_dir))
    step = TrainModule(cfg, ParallelContext.single(), generator=torch.Generator().manual_seed(1))
    rng = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:  # load_checkpoint restores the run's RNG states into this process: put ours back after
        state = load_checkpoint(path, cfg, step)
    finally:
        random.setstate(rng[0]), np.random.set_state(rng[1]), torch.random.set_rng_state(rng[2])
    assert state.step == int(name[len("step_"):]) and step.optimizer_steps == state.step
    return state.step


def test_kill_during_save_keeps_latest_complete_and_resumes_exactly(tmp_path, data_cache):
    reference = tmp_path / "reference"
    train(reference, data_cache, *COMMON)

    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    report, seen = [], 0
    for at_least, event, delay in ATTEMPTS:
        # Past the step seen last time: that attempt's leftovers stay until a save removes them.
        seen = kill_at(run_dir, data_cache, max(at_least, seen + 1), event, delay)
        leftovers = tmp_entries(checkpoints)
        latest = assert_latest_loads(run_dir)
        # Every step saves, and a save starts only after the previous one rewrote `latest`.
        assert latest >= seen - 1, (seen, latest, leftovers)
        # A complete checkpoint `latest` does not name yet (killed between the rename and the rewrite).
        unpublished = [n for n in list_checkpoints(run_dir) if n > latest]
        assert unpublished in ([], [latest + 1]), (unpublished, latest)
        step_dirs = [name for name in leftovers if name.startswith(TMP_PREFIX + "step_")]
        if step_dirs:  # killed inside the save of that step: latest is the step before
            assert step_dirs == [f"{TMP_PREFIX}step_{latest + 1}"], (step_dirs, latest)
        written = {name: sorted(str(p.relative_to(checkpoints / name)) for p in (checkpoints / name).rglob("*"))
                   for name in step_dirs}
        report.append({"step": seen, "event": event, "delay_s": delay, "latest": latest,
                       "inside_save": bool(leftovers or unpublished), "unpublished": unpublished,
                       "leftovers": leftovers, "tmp_contents": written})
    print("kills:", *report, sep="\n  ")
    assert any(r["inside_save"] for r in report), f"no kill landed inside a save: {report}"

    result = train(run_dir, data_cache, *COMMON)  # resume to the end with the same command
    assert "resumed from" in result.stdout
    assert losses(run_dir) == losses(reference)
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert eval_losses(run_dir) == eval_losses(reference)
    assert (checkpoints / "latest").read_text().strip() == f"step_{STEPS}"
    assert tmp_entries(checkpoints) == []
