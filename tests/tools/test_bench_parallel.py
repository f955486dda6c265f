"""tools/bench_parallel.py runs real pipeline processes and prints its table (no timing asserted)."""
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_parallel.py"


def test_bench_parallel_prints_each_row():
    result = subprocess.run([sys.executable, str(TOOL), "--pp", "2", "--micro-batches", "4", "--vpp", "1", "2",
                             "--forward-ms", "5"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line[:1].isdigit()]
    assert [(r[0], r[1], r[2]) for r in rows] == [("2", "1", "4"), ("2", "2", "4")]
    assert rows[0][3] == "0.200" and rows[0][4] == "0.200"  # analytic and simulated 1F1B agree
    assert float(rows[1][4]) < float(rows[0][4])  # interleaving shrinks the simulated bubble
    assert 0.0 <= float(rows[0][5]) < 1.0
