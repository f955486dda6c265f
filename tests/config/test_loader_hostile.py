"""The loader and validation against hostile input: non-finite numbers, text YAML reads as another
type, duplicate keys, undecodable files, empty paths, a missing CUDA device. Each expectation is
written out here (lines counted by hand, messages in full), not derived from the loader."""
import math
import os

import pytest

from megacpm.config import Config, ConfigError, dump_yaml, load_config, validate
from megacpm.config.loader import parse_overrides


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def error_of(*args, **kwargs):
    with pytest.raises(ConfigError) as excinfo:
        load_config(*args, **kwargs)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# -- duplicate keys ------------------------------------------------------------------------------

def test_a_duplicate_key_names_the_file_the_key_and_both_lines(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\noptim:\n  lr: 0.01\n  eps: 1.0e-8\n  lr: 0.02\n")
    assert error_of(path) == f"optim.lr: duplicate key in {path} (lines 4 and 6; give it once)"


def test_a_duplicate_section_and_a_duplicate_nested_key(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.01\n\n\noptim:\n  eps: 1.0e-8\n")
    assert error_of(path) == f"optim: duplicate section in {path} (lines 1 and 5; give it once)"
    path = write(tmp_path, "data:\n  source: megatron\n  mixture: {/a: 1, /b: 2,\n    /a: 3}\n")
    assert error_of(path) == f"data.mixture['/a']: duplicate key in {path} (lines 3 and 4; give it once)"


def test_a_merge_key_is_not_a_duplicate(tmp_path):
    path = write(tmp_path, "model:\n  <<: {hidden_size: 128, num_hidden_layers: 2}\n  hidden_size: 64\n")
    model = load_config(path).model
    assert (model.hidden_size, model.num_hidden_layers) == (64, 2)


# -- str fields ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, field, expected", [
    ("--run.name=2024", "name", "2024"),
    ("--run.name=no", "name", "no"),
    ("--run.name=1e3", "name", "1e3"),
    ("--run.name=true", "name", "true"),
    ("--run.name=null", "name", "null"),  # run.name cannot be null: the text it is
    ("--run.name=a #b", "name", "a #b"),  # not a YAML comment
    ("--run.name=[x]", "name", "[x]"),
    ("--run.name='quoted text'", "name", "quoted text"),  # quoted YAML's way: unquoted
    ("--run.dir=2024", "dir", "2024"),
    ("--run.dir=null", "dir", "runs/tiny"),  # an optional path's null is the default again
])
def test_str_fields_keep_the_override_text(override, field, expected):
    assert getattr(load_config("tiny", [override]).run, field) == expected


def test_optional_path_fields_keep_text_or_take_null():
    data = load_config("tiny", ["--data.path=1e3", "--data.tokenizer=~", "--data.cache_dir=off"]).data
    assert (data.path, data.tokenizer, data.cache_dir) == ("1e3", None, "off")
    # Choice and number fields still read YAML: cpu is the choice, 3e-3 a number.
    cfg = load_config("tiny", ["--train.device=cpu", "--optim.lr=3e-3"])
    assert cfg.train.device == "cpu" and cfg.optim.lr == 0.003
    # parse_overrides (no field types) still reads every value as YAML.
    assert parse_overrides(["--run.name=2024"]) == [("run.name", 2024)]


@pytest.mark.parametrize("value, read_as", [
    ("no", "the boolean false"), ("on", "the boolean true"), ("1e3", "the number 1000.0"),
    ("2024", "the number 2024"), ("2024-01-01", "a date"),
])
def test_yaml_text_read_as_another_type_is_refused_with_a_quote_hint(tmp_path, value, read_as):
    path = write(tmp_path, f"train:\n  steps: 5\nrun:\n  name: {value}\n")
    assert error_of(path) == (f'run.name: YAML reads {value} as {read_as}, not a string: quote it ("{value}") '
                              f"({path}:4)")
    quoted = write(tmp_path, f"run:\n  name: '{value}'\n", "q.yaml")
    assert load_config(quoted).run.name == value


def test_ambiguous_strings_survive_the_run_directory(tmp_path):
    cfg = load_config("tiny", ["--run.name=1e3", "--data.path=no", "--data.tokenizer=2024",
                               f"--run.dir={tmp_path}"])
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    again = load_config(str(tmp_path))
    assert (again.run.name, again.data.path, again.data.tokenizer) == ("1e3", "no", "2024")
    assert again == cfg


def test_exponent_numbers_without_a_dot_are_numbers_in_files(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 3e-3\n  eps: 1E-8\ntrain:\n  steps: 1e3\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.eps, cfg.train.steps) == (0.003, 1e-8, 1000)
    assert type(cfg.train.steps) is int


# -- non-finite numbers --------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("--optim.lr=.nan", "optim.lr: must be a finite number, got nan"),
    ("--optim.lr=.inf", "optim.lr: must be a finite number, got inf"),
    ("--optim.lr=-.inf", "optim.lr: must be a finite number, got -inf"),
    ("--optim.lr=-Infinity", "optim.lr: must be a finite number, got -inf"),
    ("--optim.eps=NaN", "optim.eps: must be a finite number, got nan"),
    ("--schedule.half_life=.inf", "schedule.half_life: must be a finite number, got inf"),  # Optional[float]
    (f"--optim.lr={10**400}", "optim.lr: must be a finite number, got " + "1" + "0" * 76 + "..."),
    ("--data.mixture={a: 1, b: .nan}", "data.mixture['b']: must be a finite number, got nan"),
    ("--model.rope_scaling={type: dynamic, factor: 2, extra: [1, .inf]}",
     "model.rope_scaling['extra'][1]: must be a finite number, got inf"),
    ("--log.profile_steps=[1, .nan]", "log.profile_steps[1]: expected an integer, got nan"),
])
def test_non_finite_numbers_are_refused_anywhere(override, message):
    assert error_of("tiny", [override]) == message


def test_non_finite_numbers_in_a_file_name_the_line(tmp_path):
    path = write(tmp_path, "data:\n  source: megatron\n  mixture:\n    /a: 0.5\n    /b: .NaN\n")
    assert error_of(path) == f"data.mixture['/b']: must be a finite number, got nan ({path}:5)"


def test_validate_refuses_non_finite_values_set_in_code():
    cfg = Config()
    cfg.optim.weight_decay = math.inf
    with pytest.raises(ConfigError, match=r"^optim\.weight_decay: must be a finite number, got inf$"):
        validate(cfg, check_data=False)
    cfg = Config()
    cfg.model.rope_scaling = {"type": "dynamic", "factor": math.nan}
    with pytest.raises(ConfigError, match=r"^model\.rope_scaling\['factor'\]: must be a finite number, got nan$"):
        validate(cfg, check_data=False)


# -- types ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("--train.steps=true", "train.steps: expected an integer, got True"),
    ("--train.steps=1.5", "train.steps: expected an integer, got 1.5"),
    ("--train.steps=1e20", "train.steps: expected an integer, got 1e+20"),
    (f"--train.seed={2**63}", f"train.seed: must be an integer of magnitude below 2**63, got {2**63}"),
    ("--optim.lr=false", "optim.lr: expected a number, got False"),
    ("--optim.lr={a: 1}", "optim.lr: expected a number, got {'a': 1}"),
    ("--data.mixture=3", "data.mixture: expected mapping or null, got 3"),
    ("--data.mixture={1: 0.5}", "data.mixture: keys must be strings, got 1 (quote it in YAML)"),
    ("--data.mixture={a: true}", "data.mixture['a']: expected a number, got True"),
    ("--schedule.decay_start=x", "schedule.decay_start: expected int or null, got 'x'"),
])
def test_wrong_types_name_the_key(override, message):
    assert error_of("tiny", [override]) == message


def test_the_shape_of_a_file(tmp_path):
    path = write(tmp_path, "[1, 2]\n")
    assert error_of(path).startswith(f"{path}: the top level must be a mapping of sections (run, model,")
    path = write(tmp_path, "train:\n  steps: 5\noptim: 0.1\n")
    assert error_of(path) == f"optim: a section must be a mapping of keys, got 0.1 ({path}:3)"
    path = write(tmp_path, "train:\n  stepz: 5\n")
    assert error_of(path).startswith("train.stepz: unknown key (known in 'train': steps,")
    assert error_of(path).endswith(f"({path}:2)")
    assert load_config(write(tmp_path, "")).train.steps == 200  # empty: the defaults
    assert load_config(write(tmp_path, "# only a comment\n")).train.steps == 200


# -- files that are not YAML ---------------------------------------------------------------------

def test_undecodable_bytes_name_the_offset(tmp_path):
    path = write(tmp_path, b"train:\n  steps: 5\nrun:\n  name: \xc3\x28\n")
    assert error_of(path) == f"{path}: not UTF-8 text (byte 0xc3 at offset 31)"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(b"\xff")
    assert error_of(str(run)) == f"{run / 'config.yaml'}: not UTF-8 text (byte 0xff at offset 0)"


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: [0.1\n",
     ":3:1: invalid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)"),
    ("optim:\n  lr: 1\n lr2: 2\n",
     ":3:2: invalid YAML: expected <block end>, but found '<block mapping start>' (while parsing a block mapping)"),
    ("optim:\n  lr: \x01\n", ":2: invalid YAML: unacceptable character #x0001 (special characters are not allowed)"),
    ("a: 1\n---\nb: 2\n", ":2:1: invalid YAML: but found another document (expected a single document in the stream)"),
    # Python's own limit on the digits of an int (its wording is Python's): still one line.
    ("train:\n  steps: " + "9" * 5000 + "\n", ": invalid YAML: Exceeds the limit (4300 digits)"),
    ("optim:\n  lr: " + "[" * 5000 + "\n", ": invalid YAML: nested too deeply"),
])
def test_yaml_errors_are_one_line_with_the_place(tmp_path, text, message):
    path = write(tmp_path, text)
    assert error_of(path).startswith(path + message)


# -- paths ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("--run.dir=", "run.dir: must be a non-empty path, got '' (null unsets it)"),
    ("--run.dir= \t", "run.dir: must be a non-empty path, got ' \\t' (null unsets it)"),
    ("--run.dir=a\x00b", "run.dir: must not contain control characters, got 'a\\x00b'"),
    ("--data.path=", "data.path: must be a non-empty path, got '' (null unsets it)"),
    ("--data.tokenizer= ", "data.tokenizer: must be a non-empty path, got ' ' (null unsets it)"),
    ("--data.cache_dir=", "data.cache_dir: must be a non-empty path, got '' (null unsets it)"),
])
def test_empty_paths_are_refused(override, message):
    with pytest.raises(ConfigError) as excinfo:
        validate(load_config("tiny", [override]), check_data=False)
    assert str(excinfo.value) == message


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_paths_through_files_are_refused_and_nothing_is_created(tmp_path):
    (tmp_path / "f").write_text("x")
    before = listing(tmp_path)
    f = tmp_path / "f"
    cases = [
        ([f"--run.dir={f}"], f"run.dir: {f} is a file, not a directory"),
        ([f"--run.dir={f}/a/b"], f"run.dir: {f}/a/b is under {f}, which is a file, not a directory"),
        ([f"--data.cache_dir={f}/c"], f"data.cache_dir: {f}/c is under {f}, which is a file, not a directory"),
        (["--data.source=text", f"--data.path={f}/x.txt"],
         f"data.path: {f}/x.txt does not exist ({f} is a file, not a directory)"),
        (["--data.source=megatron", f"--data.mixture={{{f}/p: 1}}"],
         f"data.mixture: {f}/p.idx does not exist ({f} is a file, not a directory)"),
        ([f"--data.tokenizer={tmp_path}"], f"data.tokenizer: {tmp_path} is not a file"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as excinfo:
            validate(load_config("tiny", [f"--run.dir={tmp_path}/run", *overrides]))
        assert str(excinfo.value) == message
    assert listing(tmp_path) == before


def test_a_broken_link_as_run_dir(tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    with pytest.raises(ConfigError, match=r"^run\.dir: \S+/link is a broken symbolic link$"):
        validate(load_config("tiny", [f"--run.dir={tmp_path}/link"]), check_data=False)


# -- device --------------------------------------------------------------------------------------

def test_cuda_without_a_device(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    cfg = load_config("tiny", ["--train.device=cuda"])
    with pytest.raises(ConfigError) as excinfo:
        validate(cfg)
    assert str(excinfo.value) == (f"train.device: cuda requested but no CUDA device is visible "
                                  f"(torch {torch.__version__} is built without CUDA)")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match=r"CUDA_VISIBLE_DEVICES=''\)$"):
        validate(cfg)
    validate(cfg, check_data=False)  # planning for another machine (megacpm info) does not look
    validate(load_config("tiny", ["--train.device=auto"]))  # auto falls back to the CPU


def test_cuda_device_of_this_rank_out_of_range(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ConfigError) as excinfo:
        validate(load_config("tiny", ["--train.device=cuda"]))
    assert str(excinfo.value) == ("train.device: cuda device 2 (LOCAL_RANK) requested but 2 CUDA device(s) "
                                  "are visible (CUDA_VISIBLE_DEVICES='4,5')")
    monkeypatch.setenv("LOCAL_RANK", "1")
    validate(load_config("tiny", ["--train.device=cuda"]))


# -- other holes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("--train.seed=-5", "train.seed: must be non-negative, got -5"),
    ("--parallel.timeout_s=2e9", "parallel.timeout_s: must be at most 1e+09 seconds, got 2e+09"),
    ("--train.num_threads=100000", "train.num_threads: must be at most 65536, got 100000"),
    ("--model.rope_scaling={type: dynamic, factor: true}",
     "model.rope_scaling: expected null or {type: dynamic, factor: F >= 1}, got {'type': 'dynamic', 'factor': True}"),
])
def test_other_values_that_cannot_work(override, message):
    with pytest.raises(ConfigError) as excinfo:
        validate(load_config("tiny", [override]), check_data=False)
    assert str(excinfo.value) == message


def test_an_empty_config_name_and_control_characters_stay_one_line():
    assert error_of("") == "CONFIG: must be a preset name, YAML file or run directory, got ''"
    assert error_of("a\nb").startswith("'a\\nb': not a preset, YAML file or run directory")
    assert error_of("tiny", ["--train.st\neps=1"]).startswith("'train.st\\neps': unknown key")


def test_every_preset_still_loads_and_validates():
    from megacpm.config import preset_names

    for name in preset_names():
        validate(load_config(name, []), world_size=1, check_data=False)
