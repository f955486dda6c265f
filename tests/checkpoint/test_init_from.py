"""train.init_from: the source resolved from a run, a checkpoint or a Hugging Face directory, its
weights loaded into every layout's shards (tp with a vocabulary it does not divide, pp with the last
stage's tied-embedding copy), one-line refusals, and the fingerprint of the source's files."""
import json

import pytest
import torch

from megacpm.checkpoint import (CheckpointError, InitSource, TrainerState, init_fingerprint, load_initial_weights,
                                resolve_init_source, save_checkpoint, save_weights)
from megacpm.huggingface import expected_shapes, write_hf_directory
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.sharded_model import ShardedModel
from megacpm.train.train_module import TrainModule
from tests.distributed import run_distributed
from tests.tiny_run import make_config

ODD_VOCAB = 61  # tp 2 pads it to 31 rows per rank
TARGET_SEED = 0


def _config(tie: bool = True, vocab: int = ODD_VOCAB, **model):
    cfg = make_config(vocab)
    cfg.model.tie_word_embeddings = tie
    cfg.checkpoint.keep = 0
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def _random_weights(model_cfg, seed: int):
    """Model-space tensors unlike any initialisation (the norm gains too), so a load changes every one."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in expected_shapes(model_cfg).items()}


def _target(model_cfg, ctx=None, **kwargs) -> ShardedModel:
    return ShardedModel(model_cfg, ctx or ParallelContext.single(), generator=torch.Generator().manual_seed(TARGET_SEED),
                        **kwargs)


def _assert_loads_every_tensor(model: ShardedModel, weights, source: InitSource, model_cfg, dtype=torch.float32):
    before = {name: p.detach().clone() for name, p in model.params_by_name().items()}
    assert set(before) == set(weights)
    for name, value in before.items():
        assert not torch.equal(value, weights[name].to(dtype)), name
    load_initial_weights(source, model_cfg, model)
    for name, param in model.params_by_name().items():
        assert param.dtype == dtype, name
        assert torch.equal(param.detach(), weights[name].to(dtype)), name


def _error(fn, *args) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- one process -----------------------------------------------------------------------------------
def test_from_a_run_directory_and_from_a_checkpoint_directory(tmp_path):
    cfg = _config(tie=False, vocab=64)
    module = TrainModule(cfg, ParallelContext.single(), generator=torch.Generator().manual_seed(1))
    saved = {}
    for step in (1, 2):
        # The optimizer's masters are what a checkpoint saves; its moments and counters must be ignored.
        weights = _random_weights(cfg.model, seed=10 + step)
        module.optimizer.load_state_by_name(
            {n: {"master": w, "exp_avg": torch.ones_like(w), "exp_avg_sq": torch.ones_like(w)}
             for n, w in weights.items()}, step_count=step)
        save_checkpoint(tmp_path / "run", cfg, module, TrainerState(step=step, optimizer_steps=step))
        saved[step] = weights

    source = resolve_init_source(str(tmp_path / "run"))
    assert (source.kind, source.path, source.given) == ("checkpoint", tmp_path / "run/checkpoints/step_2",
                                                        str(tmp_path / "run"))
    assert source.describe() == f"{tmp_path}/run/checkpoints/step_2 (megacpm checkpoint, step 2)"
    _assert_loads_every_tensor(_target(cfg.model), saved[2], source, cfg.model)

    source = resolve_init_source(str(tmp_path / "run/checkpoints/step_1"))
    assert (source.kind, source.path) == ("checkpoint", tmp_path / "run/checkpoints/step_1")
    model = _target(cfg.model)  # (building a model draws from the global RNG)
    torch.manual_seed(5)
    expected_draw = torch.rand(2)
    torch.manual_seed(5)
    _assert_loads_every_tensor(model, saved[1], source, cfg.model)
    assert torch.equal(torch.rand(2), expected_draw)  # the checkpoint's RNG states are not restored


@pytest.mark.parametrize("tie, file_dtype, param_dtype", [(True, torch.float32, torch.float32),
                                                          (False, torch.bfloat16, torch.bfloat16),
                                                          (False, torch.float32, torch.bfloat16)],
                         ids=["tied-fp32", "untied-bf16", "untied-fp32-into-bf16"])
def test_from_a_hugging_face_directory(tmp_path, tie, file_dtype, param_dtype):
    cfg = _config(tie=tie)
    weights = _random_weights(cfg.model, seed=3)
    write_hf_directory(tmp_path / "hf", cfg.model, weights, file_dtype)
    source = resolve_init_source(str(tmp_path / "hf"))
    assert (source.kind, source.path) == ("huggingface", tmp_path / "hf")
    assert source.describe() == f"{tmp_path}/hf (Hugging Face MiniCPM directory)"
    expected = {name: w.to(file_dtype) for name, w in weights.items()}  # what the files hold
    _assert_loads_every_tensor(_target(cfg.model, param_dtype=param_dtype), expected, source, cfg.model,
                               dtype=param_dtype)


# -- refusals --------------------------------------------------------------------------------------
def test_what_is_not_a_source_is_one_line_naming_the_path(tmp_path):
    missing = tmp_path / "missing"
    assert _error(resolve_init_source, str(missing)).startswith(f"{missing}: does not exist (train.init_from expects")

    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    assert _error(resolve_init_source, str(file)).startswith(f"{file}: a file, not a directory")

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")
    message = _error(resolve_init_source, str(run))
    assert message.startswith(f"{run}: a megacpm run directory without a checkpoint yet"), message

    (run / "checkpoints" / "step_3").mkdir(parents=True)  # a damaged checkpoint, nothing complete
    message = _error(resolve_init_source, str(run))
    assert message.startswith(f"{run}: a megacpm run directory without a complete checkpoint; the newest, "
                              f"step_3: {run}/checkpoints/step_3/trainer_state.json: missing"), message

    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("hello")
    message = _error(resolve_init_source, str(neither))
    assert message.startswith(f"{neither}: neither a megacpm run directory"), message
    assert "Hugging Face MiniCPM directory (config.json)" in message


def test_another_model_shape_names_each_differing_field(tmp_path):
    cfg = _config(tie=True)
    weights = _random_weights(cfg.model, seed=4)
    save_weights(tmp_path / "run", cfg, weights, TrainerState(step=7))
    write_hf_directory(tmp_path / "hf", cfg.model, weights, torch.float32)
    other = _config(tie=True, intermediate_size=64, num_hidden_layers=2).model

    checkpoint = tmp_path / "run/checkpoints/step_7"
    message = _error(load_initial_weights, resolve_init_source(str(tmp_path / "run")), other, _target(other))
    assert message.startswith(f"{checkpoint}: the model's shape differs from the source's ("), message
    assert "intermediate_size is 48 in the checkpoint but 64 in the config" in message
    assert "num_hidden_layers is 4 in the checkpoint but 2 in the config" in message
    assert "hidden_size" not in message

    untied = _config(tie=False, vocab=64).model
    message = _error(load_initial_weights, resolve_init_source(str(tmp_path / "hf")), untied, _target(untied))
    assert message.startswith(f"{tmp_path / 'hf'}: the model's shape differs"), message
    assert "vocab_size is 61 in config.json but 64 in the config" in message
    assert "tie_word_embeddings is True in config.json but False in the config" in message


# -- the fingerprint -------------------------------------------------------------------------------
def test_fingerprint_follows_sizes_and_metadata_only(tmp_path):
    cfg = _config(tie=True)
    hf = write_hf_directory(tmp_path / "hf", cfg.model, _random_weights(cfg.model, seed=5), torch.float32)
    source = resolve_init_source(str(hf))
    first = init_fingerprint(source)
    assert first == init_fingerprint(source) and len(first) == 64

    weights_file = hf / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: the weights are not read
    weights_file.write_bytes(bytes(data))
    assert init_fingerprint(source) == first

    config_file = hf / "config.json"
    config = config_file.read_text()
    changed = json.loads(config)
    changed["rope_theta"] = 20000.0
    config_file.write_text(json.dumps(changed, indent=2))
    assert init_fingerprint(source) != first
    config_file.write_text(config)
    assert init_fingerprint(source) == first

    with weights_file.open("ab") as f:
        f.write(b"\0")
    grown = init_fingerprint(source)
    assert grown != first

    (hf / ".cache").mkdir()  # a download tool's bookkeeping
    (hf / ".cache" / "x.lock").write_text("1")
    assert init_fingerprint(source) == grown

    save_weights(tmp_path / "run", cfg, _random_weights(cfg.model, seed=6), TrainerState(step=1))
    checkpoint = resolve_init_source(str(tmp_path / "run"))
    before = init_fingerprint(checkpoint)
    assert before == init_fingerprint(checkpoint) != first
    with next((checkpoint.path / "state").glob("*.distcp")).open("ab") as f:
        f.write(b"\0")
    assert init_fingerprint(checkpoint) != before


# -- several processes: one spawned group for every layout and source ------------------------------
def _load_under_layouts(cases):
    """{(layout, source name): {parameter name: (local tensor, its ParamSpec's tp dim, padded_rows,
    copy_of)}} for TP2 then PP2, both in this one group of processes."""
    from megacpm.parallel.param_spec import param_spec

    out = {}
    for layout, parallel in (("tp2", dict(tp=2)), ("pp2", dict(pp=2))):
        ctx = ParallelContext.initialize(**parallel, timeout_s=120)
        for name, path, tie in cases:
            model_cfg = _config(tie=tie).model
            model = _target(model_cfg, ctx)
            load_initial_weights(resolve_init_source(path), model_cfg, model)
            out[(layout, name)] = {
                n: (p.detach().clone(), param_spec(p).shard_dim("tp"), param_spec(p).padded_rows, param_spec(p).copy_of)
                for n, p in model.params_by_name().items()}
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("init-from-sources")
    made = {}
    for tie in (True, False):
        cfg = _config(tie=tie)
        weights = _random_weights(cfg.model, seed=20 + tie)
        kind = "tied" if tie else "untied"
        write_hf_directory(root / f"hf-{kind}", cfg.model, weights, torch.float32)
        made[f"hf-{kind}"] = (str(root / f"hf-{kind}"), tie, weights)
        if tie:
            save_weights(root / f"run-{kind}", cfg, weights, TrainerState(step=4))
            made[f"checkpoint-{kind}"] = (str(root / f"run-{kind}"), tie, weights)
    return made


@pytest.fixture(scope="module")
def loaded(sources):
    cases = [(name, path, tie) for name, (path, tie, _) in sources.items()]
    return run_distributed(_load_under_layouts, 2, args=(cases,), timeout=300)


@pytest.mark.parametrize("name", ["hf-tied", "hf-untied", "checkpoint-tied"])
def test_tp2_shards_are_slices_of_the_one_process_tensors(sources, loaded, name):
    _, tie, weights = sources[name]
    ranks = [loaded[rank][("tp2", name)] for rank in range(2)]
    assert set(ranks[0]) == set(ranks[1]) == set(weights)
    padded = set()
    for param_name, full in weights.items():
        (local0, dim, pad0, _), (local1, _, pad1, _) = ranks[0][param_name], ranks[1][param_name]
        if dim is None:
            assert torch.equal(local0, full) and torch.equal(local1, full), param_name
            continue
        if pad0 is not None:  # the vocabulary: 31 rows each, rank 1's last one padding
            padded.add(param_name)
            assert dim == 0 and local0.shape[0] == local1.shape[0] == 31 and (pad0, pad1) == ((61, 31), (61, 30))
            assert torch.equal(local0, full[:31]), param_name
            assert torch.equal(local1[:30], full[31:]), param_name
            assert torch.equal(local1[30:], torch.zeros_like(local1[30:])), param_name  # padding stays zero
            continue
        half = full.shape[dim] // 2
        assert torch.equal(local0, full.narrow(dim, 0, half)), param_name
        assert torch.equal(local1, full.narrow(dim, half, half)), param_name
    assert padded == ({"embed_tokens.weight"} if tie else {"embed_tokens.weight", "lm_head.weight"})


@pytest.mark.parametrize("name", ["hf-tied", "hf-untied", "checkpoint-tied"])
def test_pp2_stages_hold_the_one_process_tensors_and_the_tied_copy(sources, loaded, name):
    _, tie, weights = sources[name]
    first, last = (loaded[rank][("pp2", name)] for rank in range(2))
    assert "embed_tokens.weight" in first and "norm.weight" in last and "lm_head.weight" in last
    for stage in (first, last):
        for param_name, (local, _, padded, copy_of) in stage.items():
            assert padded is None, param_name  # tp 1: whole tensors (the tied copy is a one-rank column split)
            assert torch.equal(local, weights[copy_of or param_name]), param_name
    assert last["lm_head.weight"][3] == ("embed_tokens.weight" if tie else None)
    owned = {n for stage in (first, last) for n, entry in stage.items() if entry[3] is None}
    assert owned == set(weights)
