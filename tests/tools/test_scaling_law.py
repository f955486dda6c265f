"""tools/scaling_law.py fit: the CLI contract of interface.md and its error messages."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "scaling_law.py"
TRUTH = {"C_N": 0.0715, "alpha": 0.29, "C_D": 0.300, "beta": 0.23, "L0": 0.31}


def run(*args):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300)


def write_points(path: Path, noise: float = 0.001) -> None:
    rng = np.random.default_rng(3)
    lines = ["run,N,D,loss"]  # an extra column, and not first: columns are found by name
    for n in (0.01, 0.04, 0.1, 0.2, 0.5):
        for d in (0.5, 2.0, 8.0, 30.0):
            loss = TRUTH["C_N"] * n ** -TRUTH["alpha"] + TRUTH["C_D"] * d ** -TRUTH["beta"] + TRUTH["L0"]
            lines.append(f"r{n}-{d},{n},{d},{loss * (1 + noise * rng.standard_normal()):.6f}")
    path.write_text("\n".join(lines) + "\n")


def test_fit_json_has_exactly_the_constants(tmp_path):
    points = tmp_path / "points.csv"
    write_points(points)
    result = run("fit", "--csv", str(points), "--json")
    assert result.returncode == 0, result.stderr
    fitted = json.loads(result.stdout)
    assert set(fitted) == set(TRUTH)
    assert fitted["alpha"] == pytest.approx(TRUTH["alpha"], abs=0.03)
    assert fitted["beta"] == pytest.approx(TRUTH["beta"], abs=0.03)
    assert fitted["L0"] == pytest.approx(TRUTH["L0"], abs=0.03)


def test_fit_text_report_and_plot(tmp_path):
    points, plot = tmp_path / "points.csv", tmp_path / "fit.png"
    write_points(points)
    result = run("fit", "--csv", str(points), "--plot", str(plot), "--budgets", "1e21")
    assert result.returncode == 0, result.stderr
    assert "tokens/param" in result.stdout and "paper" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The compute-optimal row at 1e21 FLOPs: N_opt * D_opt = C / 6 (in billions squared).
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith("1e+21")]
    n_opt, d_opt, ratio = float(rows[0][1]), float(rows[0][2]), float(rows[0][3])
    assert n_opt * d_opt == pytest.approx(1e21 / 6 / 1e18, rel=1e-3)
    assert ratio == pytest.approx(d_opt / n_opt, rel=1e-3)


@pytest.mark.parametrize("content, message", [
    ("N,D\n1,2\n", "missing loss"),
    ("N,D,loss\n0.1,1,x\n", "line 2: loss is 'x'"),
    ("N,D,loss\n0.1,-1,3\n", "line 2: D must be a positive"),
    ("N,D,loss\n0.1,1,3\n0.2,2,2.9\n", "at least 5 points"),
])
def test_bad_input_is_one_clear_line(tmp_path, content, message):
    points = tmp_path / "points.csv"
    points.write_text(content)
    result = run("fit", "--csv", str(points))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_file(tmp_path):
    result = run("fit", "--csv", str(tmp_path / "nope.csv"))
    assert result.returncode == 2 and "no such file" in result.stderr
