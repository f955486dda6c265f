"""A branch's shape changes (megacpm.checkpoint.reshape): untying the embeddings and growing the
vocabulary, as formulas on random states and end to end through `megacpm branch` and `megacpm
train` (the long-context curriculum: untie and pad, then ABF and a longer sequence).

References: the parent's own tensors and logits (the untied head must reproduce them bit for bit,
the padded vocabulary must leave the old rows' logits unchanged), and the documented init."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megacpm import load_pretrained
from megacpm.checkpoint import CheckpointError
from megacpm.checkpoint.manager import read_state
from megacpm.checkpoint.reshape import check_reshape, reshaped_state
from megacpm.config import ModelConfig, load_config
from megacpm.data import build_datasets
from megacpm.huggingface import expected_shapes
from tests.checkpoint.test_upcycle import SMALL, cli_ok, records
from tests.support import run_cli

SHAPE = {"vocab_size": 10, "tie_word_embeddings": True}
EVAL_TOOL = Path(__file__).resolve().parents[2] / "tools" / "eval_long_context.py"


def _state(cfg: ModelConfig, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(cfg)
    state = {"model": {n: torch.randn(s, generator=g) for n, s in shapes.items()}}
    state["optim"] = {k: {n: torch.rand(s, generator=g) for n, s in shapes.items()} for k in ("exp_avg", "exp_avg_sq")}
    return state


def _cfg(vocab, tied):
    return ModelConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=vocab, dim_model_base=8, tie_word_embeddings=tied)


@pytest.mark.parametrize("new_vocab, new_tied", [(10, False), (13, True), (13, False)])
def test_reshaped_state_follows_the_documented_rules(new_vocab, new_tied):
    parent, new = _cfg(10, True), _cfg(new_vocab, new_tied)
    state = _state(parent)
    out = reshaped_state(state, parent, new)
    assert set(out["model"]) == set(expected_shapes(new))
    embed, old_embed = out["model"]["embed_tokens.weight"], state["model"]["embed_tokens.weight"]
    assert torch.equal(embed[:10], old_embed)
    assert torch.equal(embed[10:], old_embed.mean(0).expand(new_vocab - 10, -1))
    for key, moments in out["optim"].items():
        assert torch.equal(moments["embed_tokens.weight"][:10], state["optim"][key]["embed_tokens.weight"])
        assert not moments["embed_tokens.weight"][10:].any()
        assert torch.equal(moments["layers.0.mlp.up_proj.weight"], state["optim"][key]["layers.0.mlp.up_proj.weight"])
    if not new_tied:
        assert torch.equal(out["model"]["lm_head.weight"], embed)
        assert out["model"]["lm_head.weight"].data_ptr() != embed.data_ptr()  # a copy, trained apart
        assert all(not m["lm_head.weight"].any() for m in out["optim"].values())


def test_an_untied_head_grows_with_the_vocabulary():
    parent, new = _cfg(10, False), _cfg(12, False)
    state = _state(parent, seed=1)
    head = reshaped_state(state, parent, new)["model"]["lm_head.weight"]
    assert torch.equal(head[:10], state["model"]["lm_head.weight"])
    assert torch.equal(head[10:], state["model"]["lm_head.weight"].mean(0).expand(2, -1))


@pytest.mark.parametrize("saved, new, words", [
    ({"vocab_size": 10, "tie_word_embeddings": False}, {"tie_word_embeddings": True}, "re-tie"),
    (SHAPE, {"vocab_size": 8}, "never shrink"),
])
def test_the_opposite_changes_are_refused_in_one_line(saved, new, words):
    key = next(iter(new))
    with pytest.raises(CheckpointError) as info:
        check_reshape(saved, new, lambda k: f"--model.{k}={new[k]}", "ckpt")
    assert str(info.value).startswith(f"--model.{key}=") and words in str(info.value) and "\n" not in str(info.value)


def test_no_change_needs_no_reshape():
    assert check_reshape(SHAPE, dict(SHAPE), str, "ckpt") is False


@pytest.mark.slow
def test_the_long_context_curriculum_through_the_cli(tmp_path, data_cache):
    parent = tmp_path / "parent"
    cli_ok("train", "tiny", f"--run.dir={parent}", f"--data.cache_dir={data_cache}", *SMALL, "--train.steps=4",
           "--checkpoint.interval=4")
    source = parent / "checkpoints" / "step_4"

    # Stage 1: untie and pad the vocabulary 1024 -> 1032 (a multiple of 8, as the 128K model's).
    wide = tmp_path / "untied"
    cli_ok("branch", str(source), str(wide), "--model.tie_word_embeddings=false", "--model.vocab_size=1032",
           "--train.steps=6")
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = load_pretrained(source)(ids)
        branched = load_pretrained(wide)
        after = branched(ids)
    assert after.shape[-1] == 1032
    assert torch.equal(after[..., :1024], before)  # bitwise: the head is the embedding's copy
    assert torch.equal(branched.lm_head.weight, branched.embed_tokens.weight)
    cfg = load_config(str(wide / "config.yaml"))
    state = read_state(wide / "checkpoints" / "step_4", cfg.model, expected_shapes(cfg.model))
    assert not state["optim"]["exp_avg_sq"]["lm_head.weight"].any()
    assert state["optim"]["exp_avg_sq"]["embed_tokens.weight"][:1024].any()
    meta = json.loads((wide / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert meta["step"] == 4 and meta["optimizer_steps"] == 4 and meta["seq_len"] == 64
    refused = run_cli("branch", str(wide), str(tmp_path / "shrunk"), "--model.vocab_size=1000")
    assert refused.returncode == 1 and "never shrink" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "shrunk").exists()
    cli_ok("train", str(wide))
    continued = records(wide)
    assert sorted(continued) == [5, 6] and all(r["loss"] < 10 for r in continued.values())

    # Stage 2: ABF (a larger RoPE base) and twice the sequence length; the stream continues at the
    # same token count (4 * 8 samples of 64 tokens = 16 * 8 samples of... half as many of 128).
    long = tmp_path / "long"
    cli_ok("branch", str(wide), str(long), "--model.rope_theta=40000", "--train.seq_len=128", "--train.steps=7")
    result = cli_ok("train", str(long))
    assert "the stream continues at sample 24 of 128 tokens (sample 48 of 64)" in result.stdout + result.stderr
    assert sorted(records(long)) == [7]
    meta = json.loads((long / "checkpoints" / "step_7" / "trainer_state.json").read_text())
    assert meta["seq_len"] == 128 and meta["consumed_samples"] == 56 and meta["data_start"] == 24

    # Long-context evaluation of the stage-2 run through the script, below, at and past its length:
    # each bucket's loss against plain full-logit cross entropies of the same held-out windows.
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, str(EVAL_TOOL), str(long), "--lengths", "64", "128", "256", "--windows",
                             "2", "--buckets", "4", "--passkey", "--depths", "0", "1", "--trials", "1", "--out",
                             str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert list(report["positions"]) == ["64", "128", "256"] and report["trained_seq_len"] == 128
    assert set(report["passkey"]["256"]) == {"0", "1"}
    for name in ("positions.png", "passkey.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = load_config(str(long / "checkpoints" / "step_7" / "config.yaml"))
    data = build_datasets(cfg.data, cfg.model.vocab_size, 256, cfg.train.seed, warn=lambda line: None)
    batch = data.eval_batch(2)
    with torch.no_grad():
        logits = load_pretrained(long)(batch.input_ids)
    per_token = F.cross_entropy(logits.flatten(0, 1).double(), batch.labels.flatten(), reduction="none").view(2, 256)
    want = [float(per_token[:, i * 64:(i + 1) * 64].mean()) for i in range(4)]
    assert report["positions"]["256"]["bucket_loss"] == pytest.approx(want, rel=1e-5)

