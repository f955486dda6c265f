"""tools/bench_train.py runs end to end and its figures are consistent with each other."""
import json
import subprocess
import sys
from pathlib import Path

from megacpm.config import load_config
from megacpm.train.flops import flops_per_token

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_train.py"
SMALL = ["--model.hidden_size=64", "--model.intermediate_size=160", "--model.num_hidden_layers=2",
         "--model.vocab_size=512", "--train.seq_len=32", "--train.global_batch_size=4",
         "--train.micro_batch_size=2"]


def test_bench_train_json():
    result = subprocess.run([sys.executable, str(TOOL), "tiny", *SMALL, "--steps", "2", "--warmup", "1", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["tokens_per_step"] == 4 * 32
    assert abs(figures["tokens_per_sec"] - figures["tokens_per_step"] / figures["step_s"]) < 1e-6 * figures["tokens_per_sec"]
    parts = figures["forward_backward_s"] + figures["optimizer_s"]
    assert 0.5 * figures["step_s"] <= parts <= 1.01 * figures["step_s"]
    expected_flops = flops_per_token(load_config("tiny", SMALL).model, 32)["training"]
    assert figures["flops_per_token"] == expected_flops
    assert figures["mfu"] is None  # no known peak on a CPU
    assert figures["peak_memory_bytes"] > 0


def test_bench_train_bad_config_is_one_line():
    result = subprocess.run([sys.executable, str(TOOL), "tiny", "--model.hidden_size=65"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_bench_train_vs_hf_times_the_same_function():
    """--vs-hf: transformers' LlamaForCausalLM from the Llama export of megacpm's weights computes
    megacpm's loss on the first batch (so the ratio compares one function), and the ratio is the
    two measured rates'."""
    result = subprocess.run([sys.executable, str(TOOL), "tiny", *SMALL, "--steps", "2", "--warmup", "1",
                             "--rounds", "2", "--vs-hf", "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    ours, theirs = figures["first_loss_megacpm"], figures["first_loss_transformers"]
    assert abs(ours - theirs) <= 1e-5 * abs(ours)
    assert figures["megacpm_tokens_per_sec"] > 0 and figures["transformers_tokens_per_sec"] > 0
    assert abs(figures["ratio"] - figures["megacpm_tokens_per_sec"] / figures["transformers_tokens_per_sec"]) < 1e-9
