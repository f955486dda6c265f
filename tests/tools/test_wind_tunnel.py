"""tools/wind_tunnel.py: a 2 x 2 grid end to end through the trainer, its reruns and reports, bad
input, and the batch-size law on runs whose optimum is known."""
import csv
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml

TOOL = Path(__file__).resolve().parents[2] / "tools" / "wind_tunnel.py"
SMALL = ["--steps", "4", "--seq-len", "32", "--eval-batches", "2", "--depth", "1",
         "--override", "train.global_batch_size=4", "--override", "train.micro_batch_size=4"]


def tool(*args, timeout=600):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_by_two_grid_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--out", str(out), "--widths", "64", "128", "--lrs", "0.005", "0.02",
            "--parametrization", "mup", "sp", "--jobs", "2", "--threads", "1", *SMALL]
    result = tool(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    for row in rows:
        run_dir = Path(row["run_dir"])
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        width, lr = int(row["width"]), float(row["lr"])
        assert cfg["model"]["hidden_size"] == width and cfg["model"]["num_hidden_layers"] == 1
        assert cfg["model"]["num_attention_heads"] == width // 64
        assert cfg["model"]["intermediate_size"] == int(2.5 * width)
        assert cfg["model"]["use_mup"] is (row["parametrization"] == "mup")
        assert cfg["optim"]["lr"] == lr and cfg["train"]["steps"] == 4
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert max(r["lr"] for r in records if "lr" in r) == pytest.approx(lr)  # the peak of the schedule
        assert float(row["eval_loss"]) == [r["eval_loss"] for r in records if "eval_loss" in r][-1]
        assert not (run_dir / "checkpoints").exists()  # removed once the point is done
    assert (out / "loss_vs_lr.png").read_bytes()[:4] == b"\x89PNG"
    assert "best learning rate" in result.stdout and "grid step" in result.stdout

    # A rerun trains nothing: every point is read back from its result.json.
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")}
    again = tool(*args)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")} == before
    assert list(csv.DictReader((out / "results.csv").open())) == rows

    # An interrupted point (no result.json) is trained again, from scratch.
    victim = Path(rows[0]["run_dir"])
    (victim / "result.json").unlink()
    (victim / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n')
    assert tool(*args).returncode == 0
    assert list(csv.DictReader((out / "results.csv").open()))[0]["eval_loss"] == rows[0]["eval_loss"]

    report = tool("report", str(out))
    assert report.returncode == 0 and "mup" in report.stdout and "sp" in report.stdout


@pytest.mark.parametrize("args, message", [
    (["--widths", "96", "--lrs", "0.01"], "width 96 is not a positive multiple of head_dim 64"),
    (["--widths", "64", "--lrs", "0.01", "--override", "train.bogus=1"], "train.bogus"),
    (["--widths", "64", "--shapes", "64x2", "--lrs", "0.01"], "exactly one of --widths, --shapes, --proxies"),
    (["--proxies", "7m", "--lrs", "0.01"], "unknown proxy '7m'"),
])
def test_bad_grid_fails_before_any_run(tmp_path, args, message):
    out = tmp_path / "sweep"
    result = tool("sweep", "--out", str(out), *args, "--steps", "2")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (out / "runs").exists()


def fake_batch_sweep(out: Path, a: float, b: float) -> None:
    """Finished runs of one model at several batch sizes, as a sweep leaves them, whose loss curves
    come from "reaching loss L with batch B takes T(L) (B/B* + B*/B) / 2 tokens", B* = a / L^b."""
    from megacpm.scaling.sweep import PointResult

    levels = np.linspace(3.0, 6.0, 301)
    for sequences in (2, 4, 8, 16, 32, 64):
        batch = sequences * 128
        b_star = a / levels ** b
        needed = 1e8 * levels ** -3 * (batch / b_star + b_star / batch) / 2
        tokens = np.arange(1, 60001) * batch
        loss = np.interp(tokens, needed[::-1], levels[::-1], left=levels[-1], right=levels[0])
        run_dir = out / "runs" / f"mup_w64_lr0.01_bs{sequences}"
        run_dir.mkdir(parents=True)
        keep = np.unique(np.geomspace(1, len(tokens), 3000).astype(int)) - 1  # a log_interval's thinning
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": int(i + 1), "loss": float(loss[i]), "tokens": int(tokens[i])}) + "\n" for i in keep))
        result = PointResult("mup", 64, 0.01, None, None, None, None, sequences, "ok", float(loss[-1]),
                             float(loss[-1]), len(tokens), int(tokens[-1]), 1.0, str(run_dir))
        (run_dir / "result.json").write_text(json.dumps(asdict(result)))


def test_batch_law_recovers_the_exponent(tmp_path):
    out = tmp_path / "sweep"
    fake_batch_sweep(out, a=3e4, b=2.0)
    result = tool("batch-law", str(out), "--levels", "3.4", "3.7", "4.0", "4.4", "4.8", "--window-tokens", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    fitted = json.loads((out / "batch_law.json").read_text())
    assert fitted["b"] == pytest.approx(2.0, rel=0.1)
    assert fitted["a"] / 4.0 ** fitted["b"] == pytest.approx(3e4 / 4.0 ** 2, rel=0.15)
    assert "paper: bs = 1.21e+09 / L^6.240" in result.stdout
    assert (out / "batch_law.png").read_bytes()[:4] == b"\x89PNG"


def test_batch_law_needs_three_batch_sizes(tmp_path):
    (tmp_path / "runs").mkdir()
    result = tool("batch-law", str(tmp_path))
    assert result.returncode == 2 and "3 or more batch sizes" in result.stderr


def test_a_diverged_point_is_recorded_and_not_retried(tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--out", str(out), "--widths", "64", "--lrs", "0.01", "--parametrization", "sp",
            "--init-stds", "1e20", *SMALL]  # an init that overflows at the first step
    result = tool(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = list(csv.DictReader((out / "results.csv").open()))
    assert row["status"] == "diverged" and row["eval_loss"] == ""
    assert "1 run(s) diverged" in result.stdout and "diverged" in result.stdout
    marker = out / "runs" / "sp_w64_lr0.01_d1_std1e+20" / "result.json"
    before = marker.stat().st_mtime_ns
    assert tool(*args).returncode == 0
    assert marker.stat().st_mtime_ns == before  # read back, not trained again


@pytest.mark.slow
def test_points_under_torchrun_match_single_process_points(tmp_path):
    """--nproc-per-point 2 runs each point data-parallel on 2 gloo processes: the same losses."""
    losses = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        result = tool("sweep", "--out", str(out), "--widths", "64", "--lrs", "0.01", "--parametrization", "mup",
                      "--nproc-per-point", str(nproc), "--threads", "1", *SMALL[:-1], "train.micro_batch_size=2")
        assert result.returncode == 0, result.stdout + result.stderr
        (run_dir,) = (out / "runs").iterdir()
        if nproc == 2:
            assert "dp 2" in (run_dir / "train.log").read_text()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[nproc] = [r.get("loss", r.get("eval_loss")) for r in records]
    assert losses[1] == pytest.approx(losses[2], abs=1e-4)
