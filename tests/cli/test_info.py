"""`megacpm info`: the paper's parameter counts, computed without allocating the model."""
import json

import pytest

from tests.support import run_cli


@pytest.mark.parametrize("preset, non_embedding, vocab, hidden, tied", [
    ("minicpm-2.4b", 2442057984, 122753, 2304, True),
    ("minicpm-1.2b", 1247442432, 73440, 1536, True),
    ("minicpm-2.4b-128k", 2442057984, 122760, 2304, False),
])
def test_info_json_reports_the_papers_counts(preset, non_embedding, vocab, hidden, tied):
    result = run_cli("info", preset, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["non_embedding_params"] == non_embedding
    assert info["total_params"] == non_embedding + (1 if tied else 2) * vocab * hidden
    # PaLM's convention: 6 x matmul parameters (LM head included, norms negligible) + 12 L H Q T.
    cfg = info["resolved_config"]
    model, seq = cfg["model"], cfg["train"]["seq_len"]
    matmul_params = non_embedding + vocab * hidden - (2 * model["num_hidden_layers"] + 1) * hidden
    attention = 12 * model["num_hidden_layers"] * hidden * seq
    assert info["flops_per_token"] == 6 * matmul_params + attention
    memory = info["memory_per_rank_bytes"]
    # Planned for CUDA: bf16 weights, fp32 gradient buffer, fp32 masters + two moments.
    assert memory["weights"] == 2 * info["total_params"]
    assert memory["grads"] == 4 * info["total_params"]
    assert memory["optimizer"] == 12 * info["total_params"]
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")


def test_info_text_and_overrides():
    result = run_cli("info", "tiny", "--model.num_hidden_layers=8")
    assert result.returncode == 0, result.stderr
    assert "non-embedding params" in result.stdout and "num_hidden_layers: 8" in result.stdout


def test_info_bad_override_is_one_line():
    result = run_cli("info", "tiny", "--model.hidden_size=250")
    assert result.returncode == 2
    assert "model.num_attention_heads" in result.stderr and "Traceback" not in result.stderr


def test_info_reports_moe_total_and_active_parameters_and_expert_parallel_memory():
    """MiniCPM-MoE-8x2B: 13.6B non-embedding parameters, about 4.0B active per token (the paper)."""
    result = run_cli("info", "minicpm-moe-8x2b", "--json", "--world-size=16", "--parallel.ep=8")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    layers, hidden, inter, vocab, experts, k = 40, 2304, 5760, 122753, 8, 2
    expert_params = layers * experts * 3 * hidden * inter
    assert info["expert_params"] == expert_params
    assert round(info["non_embedding_params"] / 1e9, 1) == 13.6
    assert info["non_embedding_params"] == 2442057984 - layers * 3 * hidden * inter + expert_params \
        + layers * experts * hidden  # the dense model's MLPs become experts, plus a router per layer
    idle = expert_params * (experts - k) // experts
    assert info["active_non_embedding_params"] == info["non_embedding_params"] - idle
    assert round(info["active_non_embedding_params"] / 1e9, 1) == 4.0
    # FLOPs by active parameters: the router and k experts' matmuls, the LM head, no norms.
    matmul_params = info["active_non_embedding_params"] + vocab * hidden - (2 * layers + 1) * hidden
    assert info["flops_per_token"] == 6 * matmul_params + 12 * layers * hidden * 4096
    # ep = 8 holds one expert of each layer per rank; everything else whole (tp = pp = 1).
    per_rank = info["total_params"] - expert_params + expert_params // 8
    assert info["memory_per_rank_bytes"]["weights"] == 2 * per_rank


def test_info_text_names_the_experts_and_active_parameters():
    result = run_cli("info", "tiny-moe")
    assert result.returncode == 0, result.stderr
    assert "4 per layer, top-2" in result.stdout and "active params / token" in result.stdout
