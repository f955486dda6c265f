"""tools/bench_data.py runs end to end (the C++ and numpy builders agree inside it) and reports rates."""
import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_data.py"


def test_bench_data_json():
    result = subprocess.run([sys.executable, str(TOOL), "--tokens", "2e6", "--seq-len", "64", "--blend-samples", "20000",
                             "--read-tokens", "2e5", "--reads", "500", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["sample_index"]["samples"] == (figures["sample_index"]["tokens"] - 1) // 64
    assert figures["blending"]["samples"] == 20000 and figures["random_reads"]["reads_per_s"] > 0
