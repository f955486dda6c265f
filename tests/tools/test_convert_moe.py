"""MiniCPM-MoE through tools/convert_checkpoint.py and megacpm.load_pretrained: Hugging Face's one
tensor per expert <-> megacpm's stacked experts, bit-exact both ways, the same logits, and one line
for every way an MoE directory can be unusable.

The Hugging Face directory is written here by hand from the released MiniCPM-MoE-8x2B layout
(config.json with num_experts / num_experts_per_tok; ``model.layers.L.mlp.gate.weight`` [E, H] and
``model.layers.L.mlp.experts.e.{w1,w3,w2}.weight``), not by megacpm's writer. The tool runs in this
process (its imports are most of a subprocess's time); one bad input also runs it as a script.
"""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import megacpm
from megacpm.config import config_from_dict
from megacpm.huggingface import MOE_FIELDS, ConversionError, hf_config, model_config_from_hf, read_hf_weights
from megacpm.model import MiniCPM
from tests.support import imported_tool
from tests.tools.test_convert_checkpoint import TOOL, VOCAB, convert, model_config

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, EXPERTS, TOP_K = 64, 32, 2, 4, 2, 4, 2
CONFIG = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "hidden_size": HIDDEN,
          "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
          "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "dim_model_base": 16, "scale_emb": 12.0,
          "scale_depth": 1.4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
          "tie_word_embeddings": False, "num_experts": EXPERTS, "num_experts_per_tok": TOP_K}


def released_tensors(seed=0):
    """The released names and shapes, random values (norm gains too, so a mix-up shows)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, mean=0.0):
        return mean + 0.05 * torch.randn(*shape, generator=g)

    head_dim = HIDDEN // HEADS
    tensors = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": rand(HIDDEN, mean=1.0),
               "lm_head.weight": rand(VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        tensors.update({p + "input_layernorm.weight": rand(HIDDEN, mean=1.0),
                        p + "post_attention_layernorm.weight": rand(HIDDEN, mean=1.0),
                        p + "self_attn.q_proj.weight": rand(HEADS * head_dim, HIDDEN),
                        p + "self_attn.k_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
                        p + "self_attn.v_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
                        p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * head_dim),
                        p + "mlp.gate.weight": rand(EXPERTS, HIDDEN) * 20})  # a router that prefers
        for e in range(EXPERTS):
            tensors.update({p + f"mlp.experts.{e}.w1.weight": rand(INTERMEDIATE, HIDDEN),
                            p + f"mlp.experts.{e}.w3.weight": rand(INTERMEDIATE, HIDDEN),
                            p + f"mlp.experts.{e}.w2.weight": rand(HIDDEN, INTERMEDIATE)})
    return tensors


def write_hf_moe(directory, config=CONFIG, tensors=None):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    tensors = released_tensors() if tensors is None else tensors
    save_file(tensors, str(directory / "model.safetensors"))
    return tensors


def reference_model(tensors):
    """A MiniCPM holding the released tensors, experts stacked here (not by the converter)."""
    fields = {k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type")}
    model = MiniCPM(config_from_dict({"model": fields}).model)
    state = {}
    for layer in range(LAYERS):
        for kind in ("w1", "w3", "w2"):
            state[f"layers.{layer}.mlp.{kind}"] = torch.stack(
                [tensors[f"model.layers.{layer}.mlp.experts.{e}.{kind}.weight"] for e in range(EXPERTS)])
    state.update({k.removeprefix("model."): v for k, v in tensors.items() if ".experts." not in k})
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def tool():
    yield from imported_tool(TOOL, "convert_checkpoint")


@pytest.fixture
def run_tool(tool, capsys):
    """The tool's main in this process: (exit status, its stderr)."""
    def run(*args):
        capsys.readouterr()
        status = tool.main([str(a) for a in args])
        return status, capsys.readouterr().err
    return run


@pytest.fixture(scope="module")
def converted(tool, tmp_path_factory):
    """(HF directory, its tensors, the megacpm run converted from it by the tool)."""
    root = tmp_path_factory.mktemp("moe")
    tensors = write_hf_moe(root / "hf")
    assert tool.main(["--from", "hf", "--to", "megacpm", "--input", str(root / "hf"), "--output",
                      str(root / "run")]) == 0
    return root / "hf", tensors, root / "run"


def test_round_trip_is_bit_exact(converted, run_tool, tmp_path):
    hf, original, run = converted
    status, err = run_tool("--from", "megacpm", "--to", "hf", "--input", run, "--output", tmp_path / "back",
                           "--max-shard-size", "20KB")
    assert status == 0, err
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    back = {}
    for file in set(index["weight_map"].values()):
        back.update(load_file(str(tmp_path / "back" / file)))
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {k: config.get(k) for k in CONFIG} == CONFIG


def test_load_pretrained_gives_the_stacked_models_logits(converted):
    hf, tensors, run = converted
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_model(tensors)(ids)
        from_hf, from_run = (megacpm.load_pretrained(p)(ids) for p in (hf, run))
    assert from_hf.shape == (2, 9, VOCAB) and from_hf.dtype == torch.float32
    assert torch.equal(from_hf, expected) and torch.equal(from_run, expected)
    torch.testing.assert_close(from_hf, from_run, rtol=0, atol=1e-6)
    model = megacpm.load_pretrained(hf)
    assert model.cfg.is_moe and (model.cfg.num_experts, model.cfg.num_experts_per_tok) == (EXPERTS, TOP_K)


def test_llama_format_of_moe_is_refused_in_one_line(converted, run_tool, tmp_path):
    _, _, run = converted
    status, err = run_tool("--from", "megacpm", "--to", "hf", "--input", run, "--output", tmp_path / "llama",
                           "--llama-format")
    assert status == 1
    line, = err.strip().splitlines()
    assert line.startswith("convert_checkpoint: error: ") and "config.yaml" in line
    assert "mixture-of-experts model (model.num_experts 4) has no Llama format" in line
    assert not (tmp_path / "llama").exists()


def _drop_expert(tensors):
    del tensors["model.layers.0.mlp.experts.3.w2.weight"]


def _misshape_expert(tensors):
    tensors["model.layers.1.mlp.experts.2.w3.weight"] = torch.zeros(INTERMEDIATE + 1, HIDDEN)


def _extra_expert(tensors):
    tensors["model.layers.0.mlp.experts.4.w1.weight"] = torch.zeros(INTERMEDIATE, HIDDEN)


@pytest.mark.parametrize("edit, config, message", [
    (_drop_expert, CONFIG, "model.safetensors: tensor model.layers.0.mlp.experts.3.w2.weight is missing"),
    (_misshape_expert, CONFIG, "model.safetensors: tensor model.layers.1.mlp.experts.2.w3.weight has shape "
                               "(33, 64), config.json implies (32, 64)"),
    (None, {**CONFIG, "num_experts_per_tok": 5},
     "config.json: num_experts_per_tok must be in 1..num_experts (4), got 5"),
])
def test_bad_moe_input_is_one_line_and_writes_nothing(run_tool, tmp_path, edit, config, message):
    tensors = released_tensors()
    if edit is not None:
        edit(tensors)
    write_hf_moe(tmp_path / "hf", config, tensors)
    status, err = run_tool("--from", "hf", "--to", "megacpm", "--input", tmp_path / "hf", "--output", tmp_path / "run")
    assert status == 1  # an exception the tool did not turn into its one line would fail the test here
    line, = err.strip().splitlines()
    assert line.startswith(f"convert_checkpoint: error: {tmp_path / 'hf'}/") and message in line
    assert not (tmp_path / "run").exists()


def test_a_missing_expert_through_the_script_is_one_line(tmp_path):
    tensors = released_tensors()
    _drop_expert(tensors)
    write_hf_moe(tmp_path / "hf", CONFIG, tensors)
    result = convert("--from", "hf", "--to", "megacpm", "--input", tmp_path / "hf", "--output", tmp_path / "run")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"convert_checkpoint: error: {tmp_path / 'hf' / 'model.safetensors'}: tensor "
        f"model.layers.0.mlp.experts.3.w2.weight is missing; config.json implies {3 + LAYERS * (7 + 3 * EXPERTS)} "
        "tensors"]
    assert not (tmp_path / "run").exists()


def test_expert_refusals_in_process(tmp_path):
    tensors = released_tensors()
    _extra_expert(tensors)
    write_hf_moe(tmp_path / "hf", CONFIG, tensors)
    with pytest.raises(ConversionError, match=r"model\.safetensors: unexpected tensor "
                                              r"model\.layers\.0\.mlp\.experts\.4\.w1\.weight"):
        read_hf_weights(tmp_path / "hf", model_config_from_hf(tmp_path / "hf"))
    tensors = released_tensors()
    tensors["model.layers.0.mlp.experts.1.w1.weight"] = tensors["model.layers.0.mlp.experts.1.w1.weight"].long()
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"tensor model\.layers\.0\.mlp\.experts\.1\.w1\.weight is int64"):
        read_hf_weights(tmp_path / "hf", model_config_from_hf(tmp_path / "hf"))


@pytest.mark.parametrize("edit, message", [
    ({"num_experts": "4"}, "num_experts must be an integer, got a string ('4')"),
    ({"num_experts": True}, "num_experts must be an integer, got a boolean"),
    ({"num_experts": -1}, "num_experts must be >= 0 (0: no experts), got -1"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok must be in 1..num_experts (4), got 0"),
    ({"num_experts_per_tok": 2.0}, "num_experts_per_tok must be an integer, got a number (2.0)"),
    ({"num_experts_per_tok": None}, "missing num_experts_per_tok"),
])
def test_moe_config_refusals_name_the_file_and_key(tmp_path, edit, message):
    write_hf_moe(tmp_path / "hf", {**CONFIG, **edit}, {})
    with pytest.raises(ConversionError) as info:
        model_config_from_hf(tmp_path / "hf")
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'hf' / 'config.json'}: ") and message in text and "\n" not in text


def test_dense_config_json_gains_no_moe_keys(tmp_path):
    dense = model_config(tied=True)
    assert not set(MOE_FIELDS) & set(hf_config(dense, torch.float32, llama=False))
    write_hf_moe(tmp_path / "hf", {**CONFIG, "num_experts": 0, "num_experts_per_tok": 0}, {})
    assert not model_config_from_hf(tmp_path / "hf").is_moe  # a dense config that names num_experts 0
    with pytest.raises(ConversionError, match="has no Llama format"):
        hf_config(dataclasses.replace(dense, num_experts=2), torch.float32, llama=True)
