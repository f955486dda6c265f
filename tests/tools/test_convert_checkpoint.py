"""tools/convert_checkpoint.py and megacpm.load_pretrained: Hugging Face MiniCPM <-> megacpm bit-exact,
any layout loads the converted checkpoint, and the Llama-format export gives transformers'
LlamaForCausalLM the same logits.

The Hugging Face directories are written here by hand from the published layout (config.json,
``model.``-prefixed tensors, safetensors or pytorch_model.bin, optionally sharded with an index).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import megacpm
from megacpm.checkpoint import latest_checkpoint, load_checkpoint
from megacpm.config import ModelConfig, load_config
from megacpm.data.batch import Batch
from megacpm.model import MiniCPM
from megacpm.parallel.context import ParallelContext
from megacpm.train.train_module import TrainModule
from megacpm.huggingface import ConversionError, model_config_from_hf, read_hf_weights
from tests.distributed import run_distributed

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"
VOCAB = 101  # prime: the tp=2 load below exercises the padded vocabulary too


# The untied model is MiniCPM-2.4B-128K's configuration in miniature: RoPE base 1e6, dynamic NTK
# scaling by 4 past 65,536 positions (its config.json's fields, which must survive both ways).
LONG_CONTEXT = dict(rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 4.0}, max_position_embeddings=65536)


def model_config(tied):
    return ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, dim_model_base=16, tie_word_embeddings=tied,
                       **({} if tied else LONG_CONTEXT))


def hf_tensors(tied, seed=0):
    model = MiniCPM(model_config(tied))
    model.init_weights(torch.Generator().manual_seed(seed))
    return {(k if k == "lm_head.weight" else "model." + k): v for k, v in model.state_dict().items()}


def write_hf(directory, tied, layout="safetensors"):
    directory.mkdir()
    cfg = model_config(tied)
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "dim_model_base", "tie_word_embeddings", "scale_emb", "scale_depth", "rope_theta",
              "rms_norm_eps", "max_position_embeddings", "rope_scaling")
    (directory / "config.json").write_text(json.dumps({"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
                                                       **{k: getattr(cfg, k) for k in fields}}))
    tensors = hf_tensors(tied)
    if layout == "safetensors":
        save_file(tensors, str(directory / "model.safetensors"))
    elif layout == "sharded-safetensors":
        names = sorted(tensors)
        halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
        for file, keys in halves.items():
            save_file({k: tensors[k] for k in keys}, str(directory / file))
        weight_map = {k: file for file, keys in halves.items() for k in keys}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(tensors, directory / "pytorch_model.bin")
    return tensors


def convert(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tied, layout", [(True, "safetensors"), (False, "sharded-safetensors"), (True, "bin")])
def test_round_trip_is_bit_exact(tmp_path, tied, layout):
    original = write_hf(tmp_path / "hf", tied, layout)
    result = convert("--from", "hf", "--to", "megacpm", "--input", tmp_path / "hf", "--output", tmp_path / "run",
                     "--tp", "2", "--pp", "2")
    assert result.returncode == 0, result.stderr
    result = convert("--from", "megacpm", "--to", "hf", "--input", tmp_path / "run", "--output", tmp_path / "back",
                     "--max-shard-size", "20KB")
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    back = {}
    for file in set(index["weight_map"].values()):  # 20 KB shards: the writer's index path too
        back.update(load_file(str(tmp_path / "back" / file)))
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == ["MiniCPMForCausalLM"] and config["tie_word_embeddings"] == tied
    assert (config["scale_emb"], config["scale_depth"], config["dim_model_base"]) == (12.0, 1.4, 16)
    source_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "vocab_size"):
        assert config.get(key) == source_config[key], key
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = [megacpm.load_pretrained(p)(ids) for p in (tmp_path / "hf", tmp_path / "run", tmp_path / "back")]
    assert logits[0].shape == (2, 9, VOCAB) and logits[0].dtype == torch.float32
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


@pytest.mark.parametrize("tied", [True, False])
def test_llama_format_gives_transformers_the_same_logits(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    write_hf(tmp_path / "hf", tied)
    result = convert("--from", "hf", "--to", "megacpm", "--input", tmp_path / "hf", "--output", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    result = convert("--from", "megacpm", "--to", "hf", "--input", tmp_path / "run", "--output", tmp_path / "llama",
                     "--llama-format")
    assert result.returncode == 0, result.stderr
    llama = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "llama"), dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = megacpm.load_pretrained(tmp_path / "hf")(ids)
        got = llama(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def _tp2_eval_loss(run_dir, samples):
    cfg = load_config(str(run_dir), ["--parallel.tp=2", "--train.micro_batch_size=2"])
    step = TrainModule(cfg, ParallelContext.initialize(tp=2), generator=torch.Generator().manual_seed(5))
    state = load_checkpoint(latest_checkpoint(run_dir), cfg, step)
    return state.step, step.optimizer_steps, step.evaluate(Batch.from_tokens(samples))["loss"]


def test_converted_checkpoint_loads_under_tensor_parallelism(tmp_path):
    write_hf(tmp_path / "hf", tied=True)
    result = convert("--from", "hf", "--to", "megacpm", "--input", tmp_path / "hf", "--output", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    samples = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = megacpm.load_pretrained(tmp_path / "hf")(samples[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), samples[:, 1:].flatten()).item()
    for step, optimizer_steps, loss in run_distributed(_tp2_eval_loss, 2, args=(tmp_path / "run", samples)):
        assert (step, optimizer_steps) == (0, 0)  # weights only: a fresh optimizer
        assert loss == pytest.approx(expected, rel=1e-5)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    tensors = write_hf(tmp_path / "hf", tied=True)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    result = convert("--from", "hf", "--to", "megacpm", "--input", tmp_path / "hf", "--output", tmp_path / "run")
    assert result.returncode == 1
    assert "layers.1.mlp.up_proj.weight" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
    result = convert("--from", "hf", "--to", "megacpm", "--input", tmp_path / "nothing", "--output", tmp_path / "run")
    assert result.returncode == 2 and "--input: " in result.stderr and "nothing: no such directory" in result.stderr
    (tmp_path / "empty").mkdir()
    result = convert("--from", "hf", "--to", "megacpm", "--input", tmp_path / "empty", "--output", tmp_path / "run")
    assert result.returncode == 1 and "config.json: missing" in result.stderr


def _config_json(tmp_path, edit):
    write_hf(tmp_path / "hf", tied=True)
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    result = edit(config)
    path.write_bytes(result if isinstance(result, bytes) else json.dumps(config).encode())
    return tmp_path / "hf"


def _drop(key):
    return lambda c: c.pop(key) and None


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]),
     "model_type 'llama' is not MiniCPM (expected 'minicpm')"),
    (lambda c: c.update(model_type="gpt2"), "model_type 'gpt2' is not MiniCPM"),
    (lambda c: c.update(architectures=["MistralForCausalLM"]), "architectures ['MistralForCausalLM'] is not MiniCPM"),
    (lambda c: [c.pop("model_type"), c.pop("architectures")] and None, "neither model_type nor architectures"),
    (_drop("scale_emb"), "missing scale_emb (MiniCPM's muP multipliers"),
    (_drop("dim_model_base"), "missing dim_model_base"),
    (_drop("scale_depth"), "missing scale_depth"),
    (_drop("vocab_size"), "missing vocab_size"),
    (lambda c: b"{not json", "not valid JSON (Expecting property name"),
    (lambda c: b"[1, 2]", "an array, not a JSON object"),
    (lambda c: b'{"a": "\xff"}'.replace(b"\\xff", b"\xff"), "not UTF-8 text (byte 0xff at offset 7)"),
    (lambda c: c.update(hidden_size="64"), "hidden_size must be an integer, got a string ('64')"),
    (lambda c: c.update(num_hidden_layers=True), "num_hidden_layers must be an integer, got a boolean"),
    (lambda c: c.update(vocab_size=0), "vocab_size must be >= 1, got 0"),
    (lambda c: c.update(scale_depth=float("nan")), "scale_depth must be finite, got nan"),
    (lambda c: c.update(scale_emb=-1.0), "scale_emb must be > 0"),
    (lambda c: c.update(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
])
def test_config_json_refusals_name_the_file_and_field(tmp_path, edit, message):
    directory = _config_json(tmp_path, edit)
    with pytest.raises(ConversionError) as info:
        model_config_from_hf(directory)
    text = str(info.value)
    assert text.startswith(f"{directory / 'config.json'}: ") and message in text and "\n" not in text


def test_weight_refusals_name_the_file_and_tensor(tmp_path):
    tensors = write_hf(tmp_path / "hf", tied=True)
    cfg = model_config_from_hf(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    save_file({**tensors, "model.norm.weight": torch.zeros(3)}, str(weights))
    with pytest.raises(ConversionError, match=r"model\.safetensors: tensor model\.norm\.weight has shape \(3,\), "
                                              r"config\.json implies \(64,\)"):
        read_hf_weights(tmp_path / "hf", cfg)
    save_file({**tensors, "model.norm.weight": torch.ones(64, dtype=torch.int32)}, str(weights))
    with pytest.raises(ConversionError, match=r"tensor model\.norm\.weight is int32, not a floating-point weight"):
        read_hf_weights(tmp_path / "hf", cfg)
    save_file({**tensors, "model.extra.weight": torch.ones(2)}, str(weights))
    with pytest.raises(ConversionError, match=r"model\.safetensors: unexpected tensor model\.extra\.weight"):
        read_hf_weights(tmp_path / "hf", cfg)
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ConversionError, match=r"model\.safetensors: cannot be read"):
        read_hf_weights(tmp_path / "hf", cfg)
    weights.unlink()
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x"}}))
    with pytest.raises(ConversionError, match=r"index\.json: weight_map names '\.\./x'"):
        read_hf_weights(tmp_path / "hf", cfg)


def test_output_is_atomic_on_sigterm(tmp_path):
    """SIGTERM while the run is being written: no output, no temporary, one line."""
    write_hf(tmp_path / "hf", tied=True)
    code = (f"import os, signal, sys; sys.argv = ['convert_checkpoint'] + sys.argv[1:]; "
            f"sys.path.insert(0, {str(TOOL.parent)!r}); import convert_checkpoint as c; "
            "real = c.atomic_directory\n"
            "import contextlib\n"
            "@contextlib.contextmanager\n"
            "def killed(final):\n"
            "    with real(final) as tmp:\n"
            "        yield tmp\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "c.atomic_directory = killed\n"
            "sys.exit(c.main())")
    result = subprocess.run([sys.executable, "-c", code, "--from", "hf", "--to", "megacpm", "--input",
                             str(tmp_path / "hf"), "--output", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip() == "convert_checkpoint: error: interrupted; no output written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
