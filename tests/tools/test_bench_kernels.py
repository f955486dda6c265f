"""tools/bench_kernels.py: its CPU mode runs the three LM-head variants on a tiny shape and they agree;
the grouped_matmul case runs at a tiny shape (triton in Triton's CPU interpreter, or skipped with a line
saying why) and its triton side agrees with the per-expert loop.

The CUDA mode needs a GPU and is not run here; --cpu makes the test the same on a machine with one.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import imported_tool

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_kernels.py"
VARIANTS = ("materialised", "torch-chunked", "ours")
GROUPED_IMPLS = ("triton", "torch-loop", "dense")
TINY_GROUPED = ("--cpu", "--kernel", "grouped_matmul", "--tokens", 16, "--hidden", 16, "--intermediate", 16,
                "--experts", 4, "--warmup", 0, "--repeats", 1)


def run_tool(*args, env=None):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.fixture(scope="module")
def tool():
    yield from imported_tool(TOOL, "bench_kernels_tool")


def test_cpu_mode_runs_the_three_variants_and_they_agree(tmp_path):
    out = tmp_path / "rows.csv"
    result = run_tool("--cpu", "--kernel", "fused_linear_cross_entropy", "--tokens", 64, "--hidden", 32,
                      "--vocab", 1000, "--warmup", 0, "--repeats", 1, "--csv", out)
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


def test_grouped_case_runs_triton_in_the_interpreter_and_it_agrees(tmp_path):
    """TRITON_INTERPRET=1 (set before triton is imported, hence a fresh process): the three impls, both passes."""
    out = tmp_path / "grouped.csv"
    result = run_tool(*TINY_GROUPED, "--csv", out, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "triton agrees with torch-loop" in result.stdout
    assert "its time is the interpreter's" in result.stdout
    rows = list(csv.DictReader(out.open()))
    assert [(r["pass"], r["impl"]) for r in rows] == [(p, i) for p in ("fwd", "fwd+bwd") for i in GROUPED_IMPLS]
    assert {r["kernel"] for r in rows} == {"grouped_matmul"} and rows[0]["shape"] == "h16-i16-4x-top2"
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert all(float(r["speedup_vs_eager"]) > 0 for r in rows)  # ratios against triton's row
    assert rows[0]["gbps"] == rows[0]["tflops"] == ""  # rates are CUDA-only


def test_grouped_case_without_the_interpreter_skips_triton_saying_why(tool, monkeypatch, capsys):
    monkeypatch.setattr(tool, "interpreter_enabled", lambda: False)
    assert tool.main([str(a) for a in TINY_GROUPED]) == 0
    printed = capsys.readouterr().out
    assert "grouped_matmul: triton skipped: --cpu given and TRITON_INTERPRET is not 1" in printed
    impls = [line.split()[1] for line in printed.splitlines() if line.split()[:1] in (["fwd"], ["fwd+bwd"])]
    assert impls == ["torch-loop", "dense"] * 2


def test_grouped_case_shapes(tool, monkeypatch):
    counts = tool.ragged_counts(32, 8)
    assert int(counts.sum()) == 32 and counts[1] == counts[5] == 0 and (counts > 0).sum() >= 2
    shape = tool.dataclasses.replace(tool.MODELS["2.4B"], experts=8, top_k=2)
    assert shape.moe_name == "MiniCPM-2.4B-8x-top2"
    monkeypatch.setattr(tool, "interpreter_enabled", lambda: True)  # a model shape is far too big to interpret
    assert "interpreted tile products" in tool.triton_skip_reason(shape, 4096, cpu_forced=False)
    assert tool.triton_skip_reason(tool.dataclasses.replace(shape, hidden=16, intermediate=16), 16, False) is None


def test_top_k_above_experts_is_a_one_line_error(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--experts", "2", "--top-k", "3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "bench_kernels.py: error: argument --top-k: 3 is more than --experts 2"]
