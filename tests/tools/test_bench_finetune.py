"""tools/bench_finetune.py: every variant timed on the same tokens per step, its figures consistent
with independent counts (the frozen reference model's bytes, the first pretraining loss)."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from megacpm.config import load_config
from megacpm.data.batch import IGNORE_INDEX, Batch
from megacpm.model import MiniCPM

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_finetune.py"
SMALL = ["--model.hidden_size=64", "--model.intermediate_size=160", "--model.num_hidden_layers=2",
         "--model.vocab_size=512", "--train.seq_len=32", "--train.global_batch_size=4",
         "--train.micro_batch_size=2",
         "--train.num_threads=1"]  # two threads on shared, busy cores can be a hundred times slower
VARIANTS = ["pretrain", "sft", "sft-packed", "dpo-precompute", "dpo-live"]


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_finetune", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fresh_model(cfg) -> MiniCPM:
    model = MiniCPM(cfg.model)
    model.init_weights(torch.Generator().manual_seed(cfg.train.seed))
    return model


def test_bench_finetune_json(capsys):
    # In this process (the tool's own imports are most of its time here); the CLI is run as a script
    # in test_bench_finetune_usage_errors_are_one_line.
    threads = torch.get_num_threads()
    try:
        assert load_tool().main(["tiny", *SMALL, "--steps", "1", "--warmup", "0", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)  # train.num_threads is set for the whole process
    figures = json.loads(capsys.readouterr().out)
    variants = figures["variants"]
    assert list(variants) == VARIANTS
    for name, v in variants.items():
        assert v["tokens_per_step"] == figures["tokens_per_step"] == 4 * 32, name
        assert v["rows"] == 4 and v["micro_rows"] == 2, name
        assert v["tokens_per_sec"] > 0 and v["step_s"] > 0, name
        assert abs(v["tokens_per_sec"] - v["tokens_per_step"] / v["step_s"]) < 1e-6 * v["tokens_per_sec"], name
        assert v["peak_memory_bytes"] > 0, name
    assert variants["pretrain"]["tokens_per_sec_ratio"] == 1.0 and variants["pretrain"]["memory_ratio"] == 1.0
    assert variants["pretrain"]["loss_tokens_per_step"] == 4 * 32
    for name in VARIANTS[1:]:  # the prompt half of every sample is not learned
        assert variants[name]["loss_tokens_per_step"] == 4 * 16, name
    for name in ("dpo-precompute", "dpo-live"):
        assert variants[name]["pairs"] == 2
        # The reference is the initial policy: every margin is 0, the sigmoid loss log 2.
        assert abs(variants[name]["first_loss"] - math.log(2)) < 1e-5, name
    assert variants["dpo-precompute"]["scoring_s_per_pair"] > 0

    # The frozen model: as many bytes as a freshly built MiniCPM's parameters, and (built inside
    # the variant's window next to the policy) both held at its peak.
    cfg = load_config("tiny", SMALL)
    model = fresh_model(cfg)
    expected = sum(p.numel() * p.element_size() for p in model.parameters())
    live = variants["dpo-live"]
    assert live["reference_param_bytes"] == expected == live["param_bytes"]
    assert "reference_param_bytes" not in variants["dpo-precompute"]
    assert live["peak_memory_bytes"] >= live["reference_param_bytes"] + live["param_bytes"]

    # The first pretraining loss: plain cross entropy on the logits of the same initial weights
    # and the same tokens (bench_train's random_batches: seed 0).
    windows = torch.randint(0, cfg.model.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(windows[:, :-1])
    expected_loss = F.cross_entropy(logits.reshape(-1, cfg.model.vocab_size), windows[:, 1:].reshape(-1)).item()
    assert abs(variants["pretrain"]["first_loss"] - expected_loss) <= 1e-5 * expected_loss


def test_packed_sft_batch_restarts_positions_and_masks_each_prompt():
    tool = load_tool()
    windows = torch.arange(2 * 13).view(2, 13)
    packed = tool.packed_sft_batch(Batch.from_tokens(windows), 3)  # 12 tokens: samples of 4
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3] * 3
    assert packed.document_ids[1].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    learned = (packed.labels != IGNORE_INDEX)[0].tolist()
    assert learned == [False, False, True, True] * 3
    assert torch.equal(packed.input_ids, windows[:, :-1])
    pairs = tool.dpo_batch(Batch.from_tokens(windows), 6)
    assert pairs.extras["sample_index"].tolist() == [6, 6]
    assert (pairs.labels[:, :6] == IGNORE_INDEX).all() and (pairs.labels[:, 6:] != IGNORE_INDEX).all()


def test_bench_finetune_usage_errors_are_one_line(capsys):
    result = subprocess.run([sys.executable, str(TOOL), "tiny", "--model.hidden_size=65"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("bench_finetune: error:")
    tool = load_tool()
    # Each also small and one step: a case that wrongly passed would still end soon.
    for bad in (["--train.global_batch_size=3", "--train.micro_batch_size=1"],  # no whole pairs
                ["--train.global_batch_size=10", "--train.micro_batch_size=5"],  # 5 pairs, micro-batches of 2
                ["--pack=17"],  # more samples than a row of 32 holds
                ["--steps=0"]):
        assert tool.main(["tiny", *SMALL, "--steps=1", "--warmup=0", *bad]) == 2, bad
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("bench_finetune: error:"), err
