"""tools/wsd_grid.py: decays branched from a stable run's checkpoints, their LRs, and the points file.

The end-to-end tests train one small stable run (constant LR after a 2-step warmup, checkpoints at
steps 4, 8 and 12) and branch decays from it through the tool as a user runs it. The expected LRs
are written here from the schedule's documented convention (megacpm/optim/schedule.py: t = step -
decay_start, decay_start = the first decayed step), not computed with LRSchedule.
"""
import csv
import hashlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megacpm.config import Config
from tests.support import REPO, cli_env, imported_tool, run_cli

TOOL = REPO / "tools" / "wsd_grid.py"
PEAK, GBS, SEQ, FRAC = 0.01, 4, 32, 0.5
STABLE = ["--model.hidden_size=64", "--model.intermediate_size=160", "--model.num_hidden_layers=2",
          "--model.num_attention_heads=2", "--model.num_key_value_heads=2", "--model.vocab_size=1024",
          "--model.dim_model_base=16", "--data.max_corpus_mb=0.5", "--data.val_fraction=0.1",
          "--train.steps=12", f"--train.global_batch_size={GBS}", f"--train.micro_batch_size={GBS}",
          f"--train.seq_len={SEQ}", "--train.log_interval=1", "--train.eval_interval=1000",
          "--train.eval_batches=2", "--train.num_threads=1", f"--optim.lr={PEAK}",
          # wsd with its decay far beyond train.steps: a stable run, as a real one is while it goes on.
          "--schedule.kind=wsd", "--schedule.warmup_steps=2", "--schedule.decay_start=1000",
          "--checkpoint.interval=4", "--checkpoint.keep=0", "--log.tensorboard=false", "--log.progress=false"]


@pytest.fixture(scope="module")
def tool():
    yield from imported_tool(TOOL, "wsd_grid_tool")


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], env=cli_env(), capture_output=True,
                          text=True, timeout=600)


def tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_csv(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


def one_line_error(result, *needles):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsd_grid: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def expected_lr(decay, step, branch_step, d):
    t = step - (branch_step + 1)  # decay_start = branch_step + 1 has t = 0 (the peak)
    if decay == "exp":
        half_life = d / math.log2(10)  # the default: peak / 10 at t = d
        return PEAK * 0.5 ** (t / half_life)
    assert decay == "linear"
    return PEAK * (1 - t / d)  # a ramp to min_lr = 0 at t = d


# -- quick checks of the pieces --------------------------------------------------------------------
def test_decay_steps_are_the_fraction_of_the_branch(tool):
    assert [tool.decay_steps_for(s, 0.5) for s in (4, 8)] == [4, 8]
    assert tool.decay_steps_for(9000, 0.1) == 1000  # 1000 / (9000 + 1000) = 10%
    assert tool.decay_steps_for(3, 0.01) == 1  # never a zero-step decay


def test_overrides_user_last_and_managed_keys_refused(tool):
    overrides = tool.branch_overrides(4, 4, "exp", tool.parse_user_overrides(["schedule.half_life=2"]))
    assert overrides[:5] == ["--schedule.kind=wsd", "--schedule.decay=exp", "--schedule.decay_start=5",
                             "--schedule.decay_steps=4", "--train.steps=8"]
    assert "--checkpoint.interval=0" in overrides and overrides[-1] == "--schedule.half_life=2"
    assert "--schedule.half_life=null" not in tool.branch_overrides(4, 4, "linear", [])
    for bad in ("train.steps=3", "nokey"):
        with pytest.raises(tool.ToolError):
            tool.parse_user_overrides([bad])


def test_points_file_replaces_rows_of_the_same_branch(tool, tmp_path):
    path = tmp_path / "points.csv"
    path.write_text("N,D,loss,run,note\n0.5,10,3.25,/other/decay_9,kept\n0.1,1,9.9,/this/decay_4,stale\n")
    point = tool.Point(tool.Branch(4, 1, Path("/this/decay_4"), [], Config()), 123456, 640, 5.5)
    rows = list(csv.DictReader(io.StringIO(tool.merge_rows(path, [point]))))
    assert [r["run"] for r in rows] == ["/other/decay_9", "/this/decay_4"]
    assert rows[0]["note"] == "kept" and rows[0]["loss"] == "3.25"  # other runs and extra columns kept
    assert rows[1] == {"N": "0.000123456", "D": "6.4e-07", "loss": "5.5", "run": "/this/decay_4",
                       "branch_step": "4", "decay_steps": "1", "note": ""}


# -- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stable_run(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("wsd") / "stable"
    result = run_cli("train", "tiny", f"--run.dir={run_dir}", f"--data.cache_dir={data_cache}", *STABLE)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"latest", "step_4", "step_8", "step_12"}
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("decay", ["exp", "linear"])
def test_branches_decay_and_give_points(stable_run, decay, tmp_path):
    before = tree_digest(stable_run)
    # exp: the default OUT (a sibling RUN-wsd); linear: --out elsewhere.
    out = stable_run.with_name("stable-wsd") if decay == "exp" else tmp_path / "linear"
    args = [stable_run, "--at", 4, 8, "--decay-frac", FRAC, "--decay", decay, "--run", "--threads", 1,
            "--override", "train.log_interval=1"]
    if decay != "exp":
        args += ["--out", out]
    result = run_tool(*args)
    assert result.returncode == 0, result.stderr

    finals = {}
    for s in (4, 8):
        d = round(s * FRAC / (1 - FRAC))
        branch = out / f"decay_{s}"
        cfg = yaml.safe_load((branch / "config.yaml").read_text())
        assert cfg["train"]["steps"] == s + d and cfg["schedule"]["decay"] == decay
        assert json.loads((branch / "lineage.json").read_text())["step"] == s
        lrs = {r["step"]: r["lr"] for r in records(branch) if "lr" in r}
        assert sorted(lrs) == list(range(s + 1, s + d + 1))  # resumed at s + 1: nothing at or before s
        for step, lr in lrs.items():
            assert lr == pytest.approx(expected_lr(decay, step, s, d), rel=1e-12, abs=0), (step, lr)
        evals = [r for r in records(branch) if "eval_loss" in r]
        assert [r["step"] for r in evals] == [s + d]
        finals[str(branch)] = (s, d, evals[0]["eval_loss"])
        # Only the final checkpoint is written besides the parent's (linked) one.
        assert {p.name for p in (branch / "checkpoints").iterdir()} == {"latest", f"step_{s}", f"step_{s + d}"}

    info = run_cli("info", stable_run, "--json")
    assert info.returncode == 0, info.stderr
    n = json.loads(info.stdout)["non_embedding_params"] / 1e9
    rows = read_csv(out / "points.csv")
    assert sorted(r["run"] for r in rows) == sorted(finals)
    for row in rows:
        s, d, eval_loss = finals[row["run"]]
        assert float(row["N"]) == n
        assert float(row["D"]) == (s + d) * GBS * SEQ / 1e9
        assert float(row["loss"]) == eval_loss and math.isfinite(eval_loss)
        assert (int(row["branch_step"]), int(row["decay_steps"])) == (s, d)
    assert tree_digest(stable_run) == before  # the parent is only read

    if decay == "exp":
        # Run again (as after an interruption) with a row of another model size already in the file:
        # the branches are reused and not retrained, their rows replaced, the other row kept.
        with open(out / "points.csv", "a") as f:
            f.write("0.5,10,3.25,/elsewhere/decay_9,9,1\n")
        again = run_tool(*args)
        assert again.returncode == 0, again.stderr
        assert again.stdout.count("skipped") == 2 and again.stdout.count("reusing") == 2
        rows_again = read_csv(out / "points.csv")
        foreign = dict(zip(rows[0], "0.5 10 3.25 /elsewhere/decay_9 9 1".split()))
        assert rows_again == [foreign] + rows
        assert tree_digest(stable_run) == before


@pytest.mark.slow
def test_errors_are_one_line_and_create_nothing(stable_run, tmp_path):
    out = tmp_path / "grid"
    line = one_line_error(run_tool(stable_run, "--at", 4, 5, "--decay-frac", 0.1, "--out", out), "step_5")
    assert "step_4, step_8, step_12" in line  # the checkpoints that do exist
    one_line_error(run_tool(stable_run, "--at", 4, "--decay-frac", 1.0, "--out", out), "--decay-frac")
    one_line_error(run_tool(stable_run, "--at", 4, 4, "--decay-frac", 0.1, "--out", out), "unique")
    one_line_error(run_tool(stable_run, "--at", 4, "--decay-frac", 0.1, "--out", out,
                            "--override", "model.no_such_key=1"), "model.no_such_key")
    one_line_error(run_tool(tmp_path, "--at", 4, "--decay-frac", 0.1), "not a megacpm run directory")
    assert not out.exists()
