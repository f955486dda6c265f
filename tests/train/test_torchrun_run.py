"""`megacpm train` under torchrun: every layout reproduces the single-process run through the real CLI,
two launches on 127.0.0.1 act as two nodes, and a dead or stalled rank stops the run with one clear
error instead of a hang.
"""
import json
import os
import signal
import subprocess
import time

import pytest

from megacpm.parallel.local_launch import free_port
from tests.support import run_cli, run_torchrun, start_torchrun, torchrun_command, torchrun_env
from tests.train.test_training_run import SMALL, eval_losses, losses

pytestmark = pytest.mark.slow
STEPS = 6
ARGS = [*SMALL, "--model.num_hidden_layers=4", "--train.micro_batch_size=2", f"--train.steps={STEPS}",
        "--train.log_interval=1", "--train.eval_interval=3", "--checkpoint.interval=3"]


def _train_args(run_dir, data_cache, *extra):
    return ["train", "tiny", f"--run.dir={run_dir}", f"--data.cache_dir={data_cache}", *ARGS, *extra]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("single")
    result = run_cli(*_train_args(run_dir, data_cache))
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def one_launch(tmp_path_factory, data_cache, single):
    run_dir = tmp_path_factory.mktemp("tp2dp2")
    result = run_torchrun(4, *_train_args(run_dir, data_cache, "--parallel.tp=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 ranks (tp 2 x pp 1 x dp 2)" in result.stdout
    return run_dir


def _assert_same_run(run_dir, reference):
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-4)
    assert eval_losses(run_dir) == pytest.approx(eval_losses(reference), rel=1e-4)
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))


def test_tp2_dp2_matches_one_process(one_launch, single):
    _assert_same_run(one_launch, single)
    # Rank 0 alone writes the log: one record per step, with the step's communication volume.
    records = [r for r in _records(one_launch) if "loss" in r]
    assert len(records) == STEPS
    assert all(r["comm_bytes/tp.all_reduce"] > 0 and r["comm_bytes/dp.all_reduce"] > 0 for r in records)


@pytest.mark.parametrize("layout", [["--parallel.pp=2", "--parallel.vpp=2"],
                                    ["--parallel.tp=2", "--parallel.sp=true", "--parallel.zero1=true"]],
                         ids=["pp2-vpp2", "tp2-sp-zero1"])
def test_other_layouts_match_one_process(tmp_path, data_cache, single, layout):
    result = run_torchrun(2, *_train_args(tmp_path, data_cache, *layout))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(tmp_path, single)


def test_two_launches_on_localhost_act_as_two_nodes(tmp_path, data_cache, one_launch):
    port = free_port()
    nodes = [subprocess.Popen(
        torchrun_command(2, *_train_args(tmp_path, data_cache, "--parallel.tp=2"),
                         launcher_args=("--nnodes=2", f"--node_rank={node}", "--rdzv_backend=c10d",
                                        f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes")),
        env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    _assert_same_run(tmp_path, one_launch)


def _start_long_run(run_dir, data_cache, *extra):
    # torchrun gives a worker 5 s (not 30) to leave after SIGTERM before it kills it.
    process = start_torchrun(2, *_train_args(run_dir, data_cache, "--parallel.tp=2", "--train.steps=1000",
                                              "--checkpoint.interval=0", *extra),
                             launcher_args=("--standalone", "--shutdown-timeout=5"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            return process
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    process.kill()
    pytest.fail("the run did not start training")


def _worker_pids(process):
    out = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


@pytest.mark.parametrize("how, timeout_s, limit_s", [("killed", 600, 30), ("stalled", 5, 60)])
def test_a_lost_rank_stops_the_others_with_a_clear_error(tmp_path, data_cache, how, timeout_s, limit_s):
    process = _start_long_run(tmp_path, data_cache, f"--parallel.timeout_s={timeout_s}")
    victim = _worker_pids(process)[-1]
    os.kill(victim, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    start = time.monotonic()
    try:
        _, err = process.communicate(timeout=limit_s)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        if how == "stalled":
            subprocess.run(["kill", "-9", str(victim)], capture_output=True)
    assert process.returncode != 0
    assert time.monotonic() - start < limit_s
    assert "megacpm: error: rank 0: lost contact with another rank" in err
    if how == "stalled":
        # A silent peer is given exactly parallel.timeout_s (then torchrun reaps the stopped one).
        assert f"parallel.timeout_s={timeout_s}s" in err and "Timed out" in err


def test_sigterm_to_torchrun_saves_and_a_new_compiled_layout_resumes_the_run(tmp_path, data_cache, single):
    process = start_torchrun(2, *_train_args(tmp_path, data_cache, "--parallel.tp=2", "--checkpoint.interval=0"))
    while not ((tmp_path / "metrics.jsonl").exists() and len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 2):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers
    out, _ = process.communicate(timeout=120)
    saved = int((tmp_path / "checkpoints" / "latest").read_text().split("_")[1])
    assert f"saved {tmp_path}/checkpoints/step_{saved}" in out
    assert saved < STEPS, "the run finished before the signal: make it longer"
    # Resumed under another layout and with compiled blocks: neither changes the run.
    result = run_torchrun(2, *_train_args(tmp_path, data_cache, "--parallel.pp=2", "--train.compile=true"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from step {saved + 1}" in result.stdout and "compiled blocks" in result.stdout
    assert "recompiled" not in result.stderr
    _assert_same_run(tmp_path, single)
