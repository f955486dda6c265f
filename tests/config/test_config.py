"""Config loading: presets, YAML round trip, dotted overrides and strict typing."""
import pytest
import yaml

from megacpm.config import Config, ConfigError, config_from_dict, dump_yaml, load_config, preset_names, validate
from megacpm.config.loader import parse_overrides


def test_presets_exist_and_validate():
    names = preset_names()
    for required in ("tiny", "minicpm-1.2b", "minicpm-2.4b", "minicpm-2.4b-128k",
                     "wt-9m", "wt-36m", "wt-66m", "wt-0.1b", "wt-0.17b", "wt-0.24b", "wt-0.5b"):
        assert required in names
    for name in names:
        validate(load_config(name), check_data=False)


def test_published_shapes():
    small = load_config("minicpm-1.2b").model
    assert (small.hidden_size, small.num_hidden_layers, small.num_key_value_heads, small.vocab_size) == (1536, 52, 8, 73440)
    assert small.width_mult == 6 and abs(small.residual_scale - 1.4 / 52 ** 0.5) < 1e-12
    long = load_config("minicpm-2.4b-128k").model
    assert long.tie_word_embeddings is False and long.rope_theta == 1e6
    assert long.rope_scaling == {"type": "dynamic", "factor": 4.0}


def test_overrides_are_typed():
    cfg = load_config("tiny", ["--train.steps=7", "--optim.lr", "3e-3", "--model.tie_word_embeddings=false",
                               "--schedule.decay=linear", "--run.dir=/tmp/x"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(3e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.model.tie_word_embeddings is False
    assert cfg.schedule.decay == "linear"
    assert cfg.run.dir == "/tmp/x"


def test_default_run_dir_is_named_after_config():
    assert load_config("tiny").run.dir == "runs/tiny"


@pytest.mark.parametrize("override, fragment", [
    ("--train.stepz=3", "train.stepz: unknown key"),
    ("--trian.steps=3", "unknown section 'trian'"),
    ("--train.steps=abc", "train.steps: expected an integer"),
    ("--train.steps=1.5", "train.steps: expected an integer"),
    ("--model.tie_word_embeddings=3", "model.tie_word_embeddings: expected true or false"),
    ("--optim.lr=fast", "optim.lr: expected a number"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        load_config("tiny", [override])


@pytest.mark.parametrize("override, fragment", [
    ("--model.num_attention_heads=3", "model.num_attention_heads"),
    ("--model.num_key_value_heads=3", "model.num_key_value_heads"),
    ("--train.steps=-1", "train.steps: must be positive"),
    ("--train.micro_batch_size=5", "train.global_batch_size"),
    ("--schedule.kind=step", "schedule.kind"),
    ("--parallel.tp=3", "parallel.tp"),
    ("--optim.beta2=1.0", "optim.beta2"),
    ("--parallel.tp=4 --model.vocab_size=5", "model.vocab_size"),  # a rank with no real token
    ("--parallel.sp=true", "parallel.sp"),
    ("--parallel.vpp=2", "parallel.vpp"),
    ("--parallel.pp=2 --parallel.vpp=2 --train.global_batch_size=4", "micro-batches per step"),
])
def test_semantic_validation_names_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        validate(load_config("tiny", ["--train.micro_batch_size=2", *override.split()]), check_data=False, world_size=4)


def test_yaml_round_trip(tmp_path):
    cfg = load_config("minicpm-2.4b-128k", ["--train.steps=11"])
    text = dump_yaml(cfg)
    again = config_from_dict(yaml.safe_load(text))
    assert again == cfg
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_config(str(path)) .model == cfg.model


def test_run_directory_as_config(tmp_path):
    cfg = load_config("tiny", ["--train.steps=5"])
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    again = load_config(str(tmp_path))
    assert again.train.steps == 5


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b=1", "--c.d", "true", "--e.f=x=y"]) == [("a.b", 1), ("c.d", True), ("e.f", "x=y")]
    with pytest.raises(ConfigError):
        parse_overrides(["steps=3"])
    with pytest.raises(ConfigError, match="missing value"):
        parse_overrides(["--train.steps"])


def test_defaults_are_a_valid_config():
    validate(Config(), check_data=False)
