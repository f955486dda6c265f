"""tools/bench_context_parallel.py at a tiny size: every (cp, core) row is reported with positive
times, and the cp group's forward bytes per layer equal the analytic volume computed here from the
model's shape (the all-gather's K and V of the whole sequence; the ring's cp - 1 blocks)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_context_parallel.py"
SMALL = ["--model.hidden_size=32", "--model.intermediate_size=48", "--model.num_hidden_layers=2",
         "--model.num_attention_heads=4", "--model.num_key_value_heads=2", "--model.vocab_size=64",
         "--model.dim_model_base=8", "--train.seq_len=32", "--train.micro_batch_size=2", "--train.device=cpu"]


def test_rows_and_bytes_against_the_analytic_volume():
    # A script, as users run it: its spawned ranks import the worker from it.
    result = subprocess.run([sys.executable, str(TOOL), "tiny", "--cp", "1", "2", "--steps", "1", "--warmup", "0",
                             "--json", *SMALL], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {(r["cp"], r["core"]): r for r in report["rows"]}
    assert set(rows) == {(1, "none"), (2, "all_gather"), (2, "ring"), (2, "ring_masked")}
    kv_bytes = 2 * 2 * 2 * 8 * 4  # K and V x micro-batch 2 x 2 kv heads x head_dim 8 x fp32, per token
    assert rows[(2, "all_gather")]["forward_bytes_per_layer"] == kv_bytes * 32  # the gathered sequence
    assert rows[(2, "ring")]["forward_bytes_per_layer"] == kv_bytes * 16  # one block of 16 tokens sent
    assert rows[(2, "ring_masked")]["forward_bytes_per_layer"] == kv_bytes * 16  # the same ring, another kernel
    assert rows[(1, "none")]["forward_bytes_per_layer"] == 0
    for row in rows.values():
        assert row["step_s"] > 0 and row["tokens_per_s"] == pytest.approx(2 * 32 / row["step_s"])
        assert row["forward_bytes_per_layer"] == row["analytic_forward_bytes_per_layer"]
    assert rows[(1, "none")]["peak_ratio_to_cp1"] == 1.0
