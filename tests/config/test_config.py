"""Config loading: presets, YAML round trip, dotted overrides and strict typing."""
import pytest
import yaml

from megacpm.config import Config, ConfigError, config_from_dict, dump_yaml, load_config, preset_names, validate
from megacpm.config.loader import parse_overrides


def test_presets_exist_and_validate():
    names = preset_names()
    for required in ("tiny", "minicpm-1.2b", "minicpm-2.4b", "minicpm-2.4b-128k",
                     "wt-9m", "wt-36m", "wt-66m", "wt-0.1b", "wt-0.17b", "wt-0.24b", "wt-0.5b",
                     "tiny-sft", "tiny-dpo", "minicpm-2.4b-sft", "minicpm-2.4b-dpo", "minicpm-1.2b-dpo"):
        assert required in names
    for name in names:
        validate(load_config(name), check_data=False)


@pytest.mark.parametrize("name, base, kind", [
    ("tiny-sft", "tiny", "sft"), ("tiny-dpo", "tiny", "dpo"), ("minicpm-2.4b-sft", "minicpm-2.4b", "sft"),
    ("minicpm-2.4b-dpo", "minicpm-2.4b", "dpo"), ("minicpm-1.2b-dpo", "minicpm-1.2b", "dpo"),
])
def test_finetuning_presets_repeat_their_base_model(name, base, kind):
    cfg = load_config(name)
    assert cfg.model == load_config(base).model  # train.init_from's shapes match
    assert cfg.objective.kind == kind and cfg.data.source == ("sft" if kind == "sft" else "preference")
    assert cfg.optim.mup_lr_scaling == (kind == "sft")  # MiniCPM's DPO trains every group at optim.lr


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
    ("--parallel.cp=2 --train.seq_len=126", "parallel.cp: train.seq_len 126 is not divisible by 2"),
    ("--parallel.cp=3 --train.seq_len=258", "parallel.pp = 3 does not divide the world size 4"),
    ("--parallel.cp=2 --model.attention_dropout=0.1", "parallel.cp: attention dropout"),
    ("--parallel.cp=2 --parallel.cp_attention=p2p", "parallel.cp_attention"),
    ("--parallel.cp=2 --model.num_experts=4 --model.moe_capacity_factor=1.25", "parallel.cp: model.moe_capacity_factor"),
    ("--train.eval_position_buckets=-1", "train.eval_position_buckets"),
    ("--train.seq_len=64 --train.eval_position_buckets=65", "train.eval_position_buckets: 65 buckets"),
    ("--train.eval_position_buckets=4 --objective.kind=dpo --data.source=preference", "train.eval_position_buckets"),
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


@pytest.mark.parametrize("override, message", [
    ("--schedule.kind=foo", "schedule.kind: must be one of wsd, cosine, constant, got 'foo'"),
    ("--schedule.decay=poly", "schedule.decay: must be one of exp, linear, cosine, 1-sqrt, got 'poly'"),
    ("--train.device=tpu", "train.device: must be one of auto, cpu, cuda, got 'tpu'"),
    ("--train.precision=fp16", "train.precision: must be one of auto, fp32, bf16, got 'fp16'"),
    ("--model.attention_impl=fast", "model.attention_impl: must be one of auto, sdpa, flash, eager, got 'fast'"),
    ("--data.source=web", "data.source: must be one of embedded, text, megatron, sft, preference, got 'web'"),
    ("--log.wandb_mode=disabled", "log.wandb_mode: must be one of online, offline, got 'disabled'"),
    ("--train.device=1", "train.device: must be one of auto, cpu, cuda, got 1"),
])
def test_choice_fields_are_checked_as_they_load(override, message):
    with pytest.raises(ConfigError) as excinfo:
        load_config("tiny", [override])
    assert str(excinfo.value) == message


def test_choices_come_from_the_literal_types():
    import typing

    from megacpm.config import schema
    from megacpm.config.schema import DATA_SOURCES, DECAY_SHAPES, SCHEDULE_KINDS, ScheduleConfig

    hints = typing.get_type_hints(ScheduleConfig)
    assert typing.get_args(hints["kind"]) == SCHEDULE_KINDS == ("wsd", "cosine", "constant")
    assert typing.get_args(hints["decay"]) == DECAY_SHAPES
    assert typing.get_args(typing.get_type_hints(schema.DataConfig)["source"]) == DATA_SOURCES
    # A value set in code (not through the loader) is still refused by validate, with the same message.
    cfg = Config()
    cfg.train.precision = "fp8"
    with pytest.raises(ConfigError, match=r"^train\.precision: must be one of auto, fp32, bf16, got 'fp8'$"):
        validate(cfg, check_data=False)


def test_uses_bf16():
    cfg = Config()
    assert cfg.train.uses_bf16("cuda") and not cfg.train.uses_bf16("cpu")  # auto
    cfg.train.precision = "bf16"
    assert cfg.train.uses_bf16("cpu") and cfg.train.uses_bf16("cuda")
    cfg.train.precision = "fp32"
    assert not cfg.train.uses_bf16("cuda")


def test_data_parallel_size_is_the_layouts():
    from megacpm.config.validate import data_parallel_size

    cfg = load_config("tiny", ["--parallel.tp=2", "--parallel.pp=2"])
    assert data_parallel_size(cfg, 8) == 2
    with pytest.raises(ConfigError, match=r"^parallel\.tp \* parallel\.pp = 4 does not divide the world size 6$"):
        data_parallel_size(cfg, 6)


def test_schedule_landmarks_resolve_in_the_config_package():
    from megacpm.config import ScheduleConfig, resolve_schedule

    landmarks = resolve_schedule(ScheduleConfig(warmup_steps=10), 0.01, 1000)
    assert (landmarks.kind, landmarks.decay_start, landmarks.decay_steps, landmarks.min_lr) == ("wsd", 901, 100, 0.0)
    with pytest.raises(ValueError, match=r"^schedule\.decay_start:"):
        resolve_schedule(ScheduleConfig(warmup_steps=10, decay_start=5), 0.01, 1000)
    # validate reports what the landmarks reject as a ConfigError naming the key.
    with pytest.raises(ConfigError, match=r"^schedule\.decay_steps:"):
        validate(load_config("tiny", ["--schedule.decay_steps=0", "--schedule.decay_start=30"]), check_data=False)
