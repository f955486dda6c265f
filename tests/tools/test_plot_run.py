"""tools/plot_run.py as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "plot_run.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True)


def write_metrics(run_dir: Path):
    records = [{"step": s, "loss": 9 - s / 10, "lr": 0.01 * min(1, s / 5), "tokens": s * 100,
                "grad_norm": 1.0} for s in range(1, 31)]
    records += [{"step": 10, "eval_loss": 8.5}, {"step": 20, "eval_loss": 7.6}]
    # A torn last line, as a crash mid-write leaves it.
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 31, "lo')


def test_writes_a_png(tmp_path):
    write_metrics(tmp_path)
    result = run_tool(tmp_path)
    assert result.returncode == 0, result.stderr
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    assert result.stdout.strip() == str(png)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temp left


def test_output_option(tmp_path):
    write_metrics(tmp_path)
    out = tmp_path / "elsewhere.png"
    result = run_tool(tmp_path, "--output", out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == PNG_SIGNATURE and not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize("content", [None, "", '{"step": 10, "eval_loss": 8.5}\n'])
def test_missing_or_empty_metrics_is_one_line(tmp_path, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    before = sorted(tmp_path.iterdir())
    result = run_tool(tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "metrics.jsonl" in lines[0] and "Traceback" not in result.stderr
    assert sorted(tmp_path.iterdir()) == before
