"""tools/bench_moe.py: at a tiny size it reports the three variants (moe, dense, loop) with positive
throughput and consistent ratios, after checking that moe equals the loop reference; that check fails
on an output or a reference that differs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import imported_tool

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_moe.py"
TINY = ["--hidden", "16", "--intermediate", "32", "--experts", "4", "--top-k", "2", "--tokens", "64",
        "--steps", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def tool():
    yield from imported_tool(TOOL, "bench_moe_tool")


def test_bench_moe_json_has_the_three_rows(tool, capsys):
    assert tool.main([*TINY, "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    variants = report["variants"]
    assert list(variants) == ["moe", "dense", "loop"]
    for name, v in variants.items():
        assert v["tokens_per_sec"] > 0 and v["step_s"] > 0, name
        assert abs(v["tokens_per_sec"] - 64 / v["step_s"]) <= 1e-9 * v["tokens_per_sec"], name
        assert abs(v["x_dense"] - v["tokens_per_sec"] / variants["dense"]["tokens_per_sec"]) <= 1e-9 * v["x_dense"]
        assert abs(v["x_loop"] - v["tokens_per_sec"] / variants["loop"]["tokens_per_sec"]) <= 1e-9 * v["x_loop"]
    assert variants["dense"]["x_dense"] == 1.0 and variants["loop"]["x_loop"] == 1.0
    assert report["dense_intermediate"] == 64 and report["dtype"] == "float32"
    assert sum(report["expert_rows"]) == 64 * 2
    assert set(report["check"]["max_rel_error"]) == {"out", "dx", "drouter", "dw1", "dw3", "dw2"}
    assert all(e <= report["check"]["rtol"] for e in report["check"]["max_rel_error"].values())


def test_check_close_raises_on_a_perturbed_output(tool):
    want = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert tool.check_close("out", want.clone(), want, torch.float32) == 0.0
    wrong = want.clone()
    wrong[3, 5] += 1e-2 * want.abs().max()
    with pytest.raises(tool.MismatchError, match="out: moe differs from the loop reference"):
        tool.check_close("out", wrong, want, torch.float32)
    with pytest.raises(tool.MismatchError, match="shape"):
        tool.check_close("out", want[:4], want, torch.float32)


def test_a_wrong_reference_fails_the_run_before_timing(tool, monkeypatch, capsys):
    """A loop reference 10% off is another function: one line, exit 1, nothing timed."""
    real = tool.loop_reference
    monkeypatch.setattr(tool, "loop_reference", lambda *args: real(*args) * 0.9)
    monkeypatch.setattr(tool, "time_round_robin", lambda *a: pytest.fail("timed after a failed check"))
    assert tool.main([*TINY, "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench_moe.py: error: out: moe differs from the loop reference")


def test_bench_moe_table(tool, capsys):
    assert tool.main([*TINY, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    names = [line.split()[0] for line in printed.splitlines() if line.startswith("  ") and line.split()]
    assert names == ["variant", "moe", "dense", "loop"]
    assert "moe equals the loop reference" in printed
    assert "moe's grouped GEMM: " in printed


def test_bench_moe_script_usage_error_is_one_line():
    bad = subprocess.run([sys.executable, str(TOOL), "--experts", "2", "--top-k", "3"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["bench_moe.py: error: argument --top-k: 3 is more than --experts 2"]


@pytest.mark.slow
def test_expert_parallel_dispatch_moves_exactly_the_analytic_bytes():
    """--ep 2: the all-to-all bytes counted on each rank equal the volume its routing implies."""
    result = subprocess.run([sys.executable, str(TOOL), *TINY, "--device", "cpu", "--ep", "2", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    dispatch = json.loads(result.stdout)["dispatch"]
    assert [r["rank"] for r in dispatch["ranks"]] == [0, 1]
    for r in dispatch["ranks"]:
        assert r["calls"] == 5  # the counts, the dispatch and the return, and the two in the backward
        assert r["bytes"] == r["analytic_bytes"] and 0 < r["off_rank_bytes"] < r["bytes"]
