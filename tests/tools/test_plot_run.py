"""tools/plot_run.py as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "plot_run.py"


def test_writes_a_png(tmp_path):
    records = [{"step": s, "loss": 9 - s / 10, "lr": 0.01 * min(1, s / 5), "tokens": s * 100} for s in range(1, 31)]
    records += [{"step": 10, "eval_loss": 8.5}, {"step": 20, "eval_loss": 7.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 31, "lo')
    result = subprocess.run([sys.executable, str(TOOL), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert result.stdout.strip() == str(png)


def test_missing_metrics_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(TOOL), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "metrics.jsonl" in result.stderr
    assert list(tmp_path.iterdir()) == []
