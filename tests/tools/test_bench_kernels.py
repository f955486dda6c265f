"""tools/bench_kernels.py: its CPU mode runs the three LM-head variants on a tiny shape and they agree.

The CUDA mode needs a GPU and is not run here; --cpu makes the test the same on a machine with one.
"""
import csv
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_kernels.py"
VARIANTS = ("materialised", "torch-chunked", "ours")


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cpu_mode_runs_the_three_variants_and_they_agree(tmp_path):
    out = tmp_path / "rows.csv"
    result = run_tool("--cpu", "--tokens", 64, "--hidden", 32, "--vocab", 1000, "--warmup", 0, "--repeats", 1,
                      "--csv", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GPU kernel timings are not measured" in result.stdout
    printed = [line.split()[0] for line in result.stdout.splitlines() if line.split() and line.split()[0] in VARIANTS]
    assert printed == list(VARIANTS)
    assert "variants agree" in result.stdout
    assert "targets for ours" in result.stdout

    rows = list(csv.DictReader(out.open()))
    assert [r["variant"] for r in rows] == list(VARIANTS)
    losses = [float(r["loss"]) for r in rows]
    assert max(losses) - min(losses) <= 1e-4 * max(losses)
    assert all(float(r["time_s"]) > 0 for r in rows)
    assert rows[0]["peak_vs_materialised"] == "1.0" and rows[1]["peak_vs_torch_chunked"] == "1.0"


def test_bad_argument_is_a_one_line_error():
    result = run_tool("--tokens", 0)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["bench_kernels.py: error: argument --tokens: expected an integer "
                                                  ">= 1, got '0'"]
