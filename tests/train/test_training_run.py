"""End-to-end training through the real CLI: the loss falls, runs resume exactly, signals save.

The reference for resume tests is an uninterrupted run of the same config: its per-step losses must
be reproduced exactly (float equality on CPU).
"""
import json
import math
import signal
import time

import pytest

from tests.support import run_cli, start_cli

pytestmark = pytest.mark.slow

# A smaller-than-tiny model on a small slice of the embedded corpus, for speed.
SMALL = ["--model.hidden_size=64", "--model.intermediate_size=160", "--model.num_hidden_layers=2",
         "--model.num_attention_heads=4", "--model.num_key_value_heads=2", "--model.vocab_size=1024",
         "--model.dim_model_base=16", "--train.seq_len=64", "--train.global_batch_size=8",
         "--train.micro_batch_size=4", "--data.max_corpus_mb=0.5", "--data.val_fraction=0.1", "--train.eval_batches=2",
         "--log.tensorboard=false", "--log.progress=false"]


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def eval_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}


def train(run_dir, data_cache, *extra):
    result = run_cli("train", "tiny", f"--run.dir={run_dir}", f"--data.cache_dir={data_cache}", *SMALL, *extra)
    assert result.returncode == 0, result.stderr
    return result


def wait_for_step(run_dir, step, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"run did not reach step {step}")


def test_loss_falls_and_run_dir_layout(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    train(run_dir, data_cache, "--train.steps=80", "--train.eval_interval=20", "--checkpoint.interval=40",
          "--log.tensorboard=true", "--schedule.warmup_steps=10", "--optim.lr=0.02")
    evals = eval_losses(run_dir)
    assert sorted(evals) == [20, 40, 60, 80]
    # Untrained, the loss is about ln(vocab); after 80 steps it must have fallen clearly.
    first = losses(run_dir)[1]
    assert abs(first - math.log(1024)) < 1.0
    assert evals[80] < evals[20] - 0.3 and evals[80] < first - 1.0
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_80"
    assert (run_dir / "checkpoints" / "step_40").is_dir()
    assert any((run_dir / "tb").iterdir())
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_sec"} <= set(record)
    assert record["tokens"] == 8 * 64


def test_kill_and_resume_reproduces_every_loss(tmp_path, data_cache):
    common = ["--train.steps=16", "--train.log_interval=1", "--train.eval_interval=8",
              "--checkpoint.interval=4", "--checkpoint.keep=2", "--schedule.warmup_steps=4"]
    reference = tmp_path / "reference"
    train(reference, data_cache, *common)

    resumed = tmp_path / "resumed"
    proc = start_cli("train", "tiny", f"--run.dir={resumed}", f"--data.cache_dir={data_cache}", *SMALL, *common)
    wait_for_step(resumed, 10, proc)
    proc.kill()  # kill -9: only the steps since the last checkpoint are lost
    proc.communicate()
    latest = (resumed / "checkpoints" / "latest").read_text().strip()
    assert latest in {"step_8", "step_12"}
    train(resumed, data_cache, *common)
    assert losses(resumed) == losses(reference)
    assert eval_losses(resumed) == eval_losses(reference)


def test_sigterm_saves_and_resumes_exactly(tmp_path, data_cache):
    common = ["--train.steps=12", "--train.log_interval=1", "--checkpoint.interval=100",
              "--schedule.warmup_steps=2"]
    reference = tmp_path / "reference"
    train(reference, data_cache, *common)
    run_dir = tmp_path / "run"
    proc = start_cli("train", "tiny", f"--run.dir={run_dir}", f"--data.cache_dir={data_cache}", *SMALL, *common)
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(saved.split("_")[1])
    assert 3 <= stopped_at < 12 and "SIGTERM" in out
    train(run_dir, data_cache, *common)
    assert losses(run_dir) == losses(reference)


def test_extending_steps_continues_the_same_data(tmp_path, data_cache):
    # A constant LR makes the schedule independent of train.steps, so 6 + 4 steps must equal 10.
    common = ["--train.log_interval=1", "--schedule.kind=constant", "--schedule.warmup_steps=2"]
    reference = tmp_path / "reference"
    train(reference, data_cache, "--train.steps=10", *common)
    run_dir = tmp_path / "run"
    train(run_dir, data_cache, "--train.steps=6", *common)
    again = run_cli("train", "tiny", f"--run.dir={run_dir}", f"--data.cache_dir={data_cache}", *SMALL,
                    "--train.steps=6", *common)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    train(run_dir, data_cache, "--train.steps=10", *common)
    assert losses(run_dir) == losses(reference)


def test_non_finite_loss_stops_with_the_step_named(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    result = run_cli("train", "tiny", f"--run.dir={run_dir}", f"--data.cache_dir={data_cache}", *SMALL,
                     "--train.steps=5", "--model.initializer_range=1e20")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "step 1" in lines[0] and "non-finite" in lines[0]
    assert not (run_dir / "checkpoints").exists()


def test_compiled_run_matches_eager_and_resumes(tmp_path, data_cache):
    # A constant LR makes 3 + 3 steps the same run as 6 (see the test above).
    common = ["--train.log_interval=1", "--train.eval_interval=3", "--schedule.kind=constant",
              "--schedule.warmup_steps=2"]
    eager = tmp_path / "eager"
    train(eager, data_cache, "--train.steps=6", *common)
    compiled = tmp_path / "compiled"
    first = train(compiled, data_cache, "--train.steps=3", "--train.compile=true", *common)
    assert "compiled the decoder blocks for training: 1 graph" in first.stdout
    assert "compiled the decoder blocks for evaluation: 1 graph" in first.stdout
    resumed = train(compiled, data_cache, "--train.steps=6", "--train.compile=true", *common)
    assert "recompiled" not in first.stderr + resumed.stderr
    assert "from step 4" in resumed.stdout and "compiled blocks" in resumed.stdout
    compiled_losses, eager_losses = losses(compiled), losses(eager)
    assert sorted(compiled_losses) == list(range(1, 7))
    for step, loss in eager_losses.items():
        assert compiled_losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step
    assert eval_losses(compiled) == pytest.approx(eval_losses(eager), rel=1e-5)
    records = [json.loads(line) for line in (compiled / "metrics.jsonl").read_text().splitlines()]
    assert all(r["recompiles"] == 0 for r in records if "loss" in r)
