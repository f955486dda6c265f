"""`megacpm upcycle`: a dense run's checkpoint becomes an MoE run through the real CLI.

References: the dense model itself (the upcycled model must compute its logits, and continue its
loss, since every expert is the dense MLP and a token's routing weights sum to 1), the formulas of
the documented optimizer rule, and an uninterrupted MoE run for the resume.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megacpm import load_pretrained
from megacpm.checkpoint.manager import read_state
from megacpm.config import load_config
from megacpm.huggingface import expected_shapes
from tests.support import run_cli

pytestmark = pytest.mark.slow
CONVERTER = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"

SMALL = ["--model.hidden_size=64", "--model.intermediate_size=160", "--model.num_hidden_layers=2",
         "--model.num_attention_heads=4", "--model.num_key_value_heads=2", "--model.vocab_size=1024",
         "--model.dim_model_base=16", "--train.seq_len=64", "--train.global_batch_size=8",
         "--train.micro_batch_size=4", "--data.max_corpus_mb=0.5", "--data.val_fraction=0.1", "--train.eval_batches=2",
         "--train.eval_interval=100", "--log.tensorboard=false", "--log.progress=false", "--train.log_interval=1",
         "--schedule.kind=constant", "--schedule.warmup_steps=2"]
MOE = ["--model.num_experts=4", "--model.moe_router_bias_update_rate=0.05"]


def records(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def cli_ok(*args):
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def dense(tmp_path_factory, data_cache):
    """A dense run of 6 steps, checkpointed at 4 and 6."""
    run_dir = tmp_path_factory.mktemp("upcycle") / "dense"
    cli_ok("train", "tiny", f"--run.dir={run_dir}", f"--data.cache_dir={data_cache}", *SMALL, "--train.steps=6",
           "--checkpoint.interval=2")
    return run_dir


def test_the_upcycled_model_is_the_dense_model_and_continues_its_loss(dense, tmp_path):
    source = dense / "checkpoints" / "step_4"
    moe = tmp_path / "moe"
    result = cli_ok("upcycle", str(source), str(moe), *MOE, "--router-seed=3")
    assert "4 experts, top-2, router seed 3" in result.stdout
    lineage = json.loads((moe / "lineage.json").read_text())
    assert lineage["step"] == 4 and lineage["parent_checkpoint"] == str(source.resolve())
    assert lineage["upcycle"] == {"num_experts": 4, "num_experts_per_tok": 2, "router_seed": 3, "router_std": 0.1,
                                  "optimizer": "carry"}

    # Logits at the branch step: the dense model's within 1e-6 (fp32).
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_logits = load_pretrained(source)(ids)
        moe_model = load_pretrained(moe)
        moe_logits = moe_model(ids)
    torch.testing.assert_close(moe_logits, dense_logits, rtol=0, atol=1e-6)
    assert moe_model.layers[0].mlp.w1.shape == (4, 160, 64)

    # The documented optimizer rule (carry): experts take their dense weight's moments, the router
    # starts at zero, everything else is the parent's; the step count goes on.
    cfg = load_config(str(moe / "config.yaml"))
    parent_cfg = load_config(str(source / "config.yaml"))
    parent = read_state(source, parent_cfg.model, expected_shapes(parent_cfg.model))
    upcycled = read_state(moe / "checkpoints" / "step_4", cfg.model, expected_shapes(cfg.model))
    for key in ("exp_avg_sq", "exp_avg"):
        want, got = parent["optim"][key], upcycled["optim"][key]
        assert torch.equal(got["layers.1.mlp.w2"], want["layers.1.mlp.down_proj.weight"].expand(4, 64, 160))
        assert torch.equal(got["layers.0.mlp.w1"][3], want["layers.0.mlp.gate_proj.weight"])
        assert torch.equal(got["layers.0.self_attn.q_proj.weight"], want["layers.0.self_attn.q_proj.weight"])
        assert not got["layers.0.mlp.gate.weight"].any()
    assert want["layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    router = upcycled["model"]["layers.0.mlp.gate.weight"]
    assert 0.07 < float(router.std()) < 0.13  # N(0, 0.1^2)
    state = json.loads((moe / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    parent_state = json.loads((source / "trainer_state.json").read_text())
    for key in ("step", "optimizer_steps", "tokens", "consumed_samples"):
        assert state[key] == parent_state[key], key

    # Trained on: step 5 reads the batch the dense run's step 5 read, through the same function.
    cli_ok("train", str(moe), "--train.steps=6")
    dense_records, moe_records = records(dense), records(moe)
    assert sorted(moe_records) == [5, 6]
    assert moe_records[5]["loss"] == pytest.approx(dense_records[5]["loss"], rel=1e-5)
    assert "moe/aux_loss" in moe_records[5] and "moe/max_load/1" in moe_records[6]
    assert (dense / "checkpoints" / "step_4").is_dir() and not (dense / "lineage.json").exists()  # parent untouched


def test_an_upcycled_run_with_balancing_resumes_exactly(dense, tmp_path):
    source = dense / "checkpoints" / "step_4"
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for run in (whole, parts):
        cli_ok("upcycle", str(source), str(run), *MOE, "--checkpoint.interval=2")
    cli_ok("train", str(whole), "--train.steps=10")
    cli_ok("train", str(parts), "--train.steps=8")
    cli_ok("train", str(parts), "--train.steps=10")  # resumes at step 8: weights, moments and router biases
    want, got = records(whole), records(parts)
    assert sorted(got) == sorted(want) == list(range(5, 11))
    for step in range(5, 11):
        for key in ("loss", "grad_norm", "moe/aux_loss", "moe/max_load/0", "moe/max_load/1"):
            assert got[step][key] == want[step][key], (step, key)
    # The biases travel with the run: load_pretrained routes with them. Six sign-rule steps of 0.05
    # from zero leave each one a multiple of 0.05 of at most 0.3 in size, not all zero.
    bias = torch.cat([layer.mlp.router_bias for layer in load_pretrained(whole).layers])
    steps = torch.round(bias / 0.05)
    assert bias.dtype == torch.float32 and steps.abs().max() <= 6 and steps.abs().sum() > 0
    torch.testing.assert_close(bias, steps * 0.05, rtol=0, atol=1e-6)
    # The Hugging Face layout has no place for them: the export says so and still writes.
    exported = subprocess.run([sys.executable, str(CONVERTER), "--from", "megacpm", "--to", "hf", "--input", str(whole),
                               "--output", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    assert "balancing biases are not part of the Hugging Face" in exported.stderr
    assert (tmp_path / "hf" / "config.json").is_file()


def test_upcycling_refuses_bad_sources_in_one_line(dense, tmp_path):
    source = dense / "checkpoints" / "step_4"
    moe = tmp_path / "moe"
    cli_ok("upcycle", str(source), str(moe), "--model.num_experts=2", "--model.num_experts_per_tok=1")
    cases = [
        (("upcycle", str(moe), str(tmp_path / "again")), "already a mixture of experts (model.num_experts = 2)"),
        (("upcycle", str(source), str(tmp_path / "wide"), "--model.hidden_size=128"), "model.hidden_size"),
        (("upcycle", str(source), str(moe)), "already exists"),
        (("upcycle", str(source), str(tmp_path / "k"), "--model.num_experts=2", "--model.num_experts_per_tok=3"),
         "model.num_experts_per_tok"),
        (("upcycle", str(tmp_path / "nowhere"), str(tmp_path / "x")), "neither a run directory"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode != 0, args
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "again").exists() and not (tmp_path / "wide").exists()
