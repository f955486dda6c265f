"""Hostile config input through the real CLI: one line, nothing created.

Every row runs ``megacpm train ...`` in a subprocess (``--run.dir={dir}/run`` unless the row is
about run.dir itself) and run_hostile checks the promises of docs/reliability.md: a non-zero exit,
exactly one ``megacpm: error: <key>: ...`` line on stderr, no traceback, the case's directory
byte-identical and no temporary left; the test adds that the run directory was not created.

The classes the table covers, each in its forms (an override, a YAML file, nested in a list or a
mapping):

1. non-finite numbers (``.nan``, ``.inf``, ``-.inf``, ``nan``, ``1e400``) in any float field, in
   overrides, YAML files, a data.mixture weight, model.rope_scaling;
2. wrong types: true for an int, 1.5 for an int, ints past int64, lists for scalars, mappings of
   the wrong shape, a YAML file whose top level or a section is not a mapping;
3. text YAML reads as another type: a str field keeps the override's text (``--data.path=1e3`` is
   the path "1e3"), a YAML file's unquoted ``name: no`` / ``1e3`` / ``2024`` is refused with a
   hint to quote it, naming the file and line;
4. empty or whitespace paths, run.dir that is a file or under one, data paths under a file;
5. a key given twice in a YAML file, at any depth (the file and both lines);
6. undecodable bytes in a config file or a run directory's config.yaml (the byte offset), YAML
   syntax errors (file:line:column), control characters, two documents, unsafe tags;
7. ``train.device=cuda`` where no CUDA device is visible;
8. other holes of the same kind: a negative seed, absurd timeouts and thread counts, a boolean
   rope factor, an empty CONFIG, a control character in an override's key.
"""
from pathlib import Path
from typing import Callable, Union

import pytest

from tests.reliability.hostile import Hostile, run_hostile

RUN = "--run.dir={dir}/run"


def train(*args: str, run_dir: bool = True):
    return ["megacpm", "train", *args, *([RUN] if run_dir else [])]


def files(**contents: Union[str, bytes]) -> Callable[[Path], None]:
    """A setup writing each ``name=content`` (``__`` in a name is a ``/``) under the case's directory."""
    def setup(directory: Path) -> None:
        for name, content in contents.items():
            path = directory / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
    return setup


def line(text: str) -> str:
    """The regex of one whole error line: ``megacpm: error: `` then ``text`` (a regex) to the end."""
    return rf"^megacpm: error: {text}$"


CASES = [
    # 1. non-finite numbers
    Hostile("nan-lr", train("tiny", "--optim.lr=.nan"), line(r"optim\.lr: must be a finite number, got nan")),
    Hostile("inf-lr", train("tiny", "--optim.lr=.inf"), line(r"optim\.lr: must be a finite number, got inf")),
    Hostile("neg-inf-lr", train("tiny", "--optim.lr=-.inf"), line(r"optim\.lr: must be a finite number, got -inf")),
    Hostile("nan-eps", train("tiny", "--optim.eps=.nan"), line(r"optim\.eps: must be a finite number, got nan")),
    Hostile("nan-word", train("tiny", "--optim.beta1=nan"), line(r"optim\.beta1: must be a finite number, got nan")),
    Hostile("overflow-to-inf", train("tiny", "--parallel.timeout_s=1e400"),
            line(r"parallel\.timeout_s: must be a finite number, got inf")),
    Hostile("nan-mixture-weight", train("tiny", "--data.source=megatron", "--data.mixture={a: 0.5, b: .nan}"),
            line(r"data\.mixture\['b'\]: must be a finite number, got nan")),
    Hostile("inf-rope-factor", train("tiny", "--model.rope_scaling={type: dynamic, factor: .inf}"),
            line(r"model\.rope_scaling\['factor'\]: must be a finite number, got inf")),
    Hostile("nan-in-yaml", train("{dir}/c.yaml"),
            line(r"optim\.lr: must be a finite number, got nan \(\S+/c\.yaml:3\)"),
            setup=files(**{"c.yaml": "optim:\n  eps: 1.0e-8\n  lr: .nan\n"})),
    Hostile("inf-in-yaml-mixture", train("{dir}/c.yaml"),
            line(r"data\.mixture\['/d/b'\]: must be a finite number, got -inf \(\S+/c\.yaml:5\)"),
            setup=files(**{"c.yaml": "data:\n  source: megatron\n  mixture:\n    /d/a: 1\n    /d/b: -.inf\n"})),
    Hostile("nan-in-yaml-list", train("{dir}/c.yaml"),
            line(r"log\.profile_steps\[2\]: expected an integer, got nan \(\S+/c\.yaml:5\)"),
            setup=files(**{"c.yaml": "log:\n  profile_steps:\n    - 1\n    - 2\n    - .nan\n"})),

    # 2. wrong types
    Hostile("bool-for-int", train("tiny", "--train.steps=true"), line(r"train\.steps: expected an integer, got True")),
    Hostile("fraction-for-int", train("tiny", "--train.global_batch_size=1.5"),
            line(r"train\.global_batch_size: expected an integer, got 1\.5")),
    Hostile("int-past-int64", train("tiny", f"--train.seed={2**70}"),
            line(rf"train\.seed: must be an integer of magnitude below 2\*\*63, got {2**70}")),
    Hostile("bool-for-float", train("tiny", "--optim.lr=yes"), line(r"optim\.lr: expected a number, got True")),
    Hostile("list-for-scalar", train("tiny", "--optim.lr=[0.1, 0.2]"),
            line(r"optim\.lr: expected a number, got \[0\.1, 0\.2\]")),
    Hostile("list-for-mapping", train("tiny", "--data.source=megatron", "--data.mixture=[a, b]"),
            line(r"data\.mixture: expected mapping or null, got \['a', 'b'\]")),
    Hostile("mapping-of-lists", train("tiny", "--data.source=megatron", "--data.mixture={a: [1]}"),
            line(r"data\.mixture\['a'\]: expected a number, got \[1\]")),
    Hostile("yaml-top-level-list", train("{dir}/c.yaml"),
            line(r"\S+/c\.yaml: the top level must be a mapping of sections \(run, .*\), got list"),
            setup=files(**{"c.yaml": "- optim\n- train\n"})),
    Hostile("yaml-top-level-scalar", train("{dir}/c.yaml"),
            line(r"\S+/c\.yaml: the top level must be a mapping of sections \(run, .*\), got int"),
            setup=files(**{"c.yaml": "3\n"})),
    Hostile("yaml-section-not-mapping", train("{dir}/c.yaml"),
            line(r"optim: a section must be a mapping of keys, got \[0\.1\] \(\S+/c\.yaml:3\)"),
            setup=files(**{"c.yaml": "train:\n  steps: 5\noptim: [0.1]\n"})),
    Hostile("yaml-bool-for-int", train("{dir}/c.yaml"),
            line(r"train\.steps: expected an integer, got True \(\S+/c\.yaml:2\)"),
            setup=files(**{"c.yaml": "train:\n  steps: yes\n"})),

    # 3. text YAML reads as another type
    Hostile("override-path-keeps-text", train("tiny", "--data.source=text", "--data.path=1e3"),
            line(r"data\.path: 1e3 does not exist")),
    Hostile("override-tokenizer-keeps-no", train("tiny", "--data.tokenizer=no"),
            line(r"data\.tokenizer: no does not exist")),
    Hostile("yaml-name-no", train("{dir}/c.yaml"),
            line(r"run\.name: YAML reads no as the boolean false, not a string: quote it \(\"no\"\) "
                 r"\(\S+/c\.yaml:2\)"),
            setup=files(**{"c.yaml": "run:\n  name: no\n"})),
    Hostile("yaml-name-1e3", train("{dir}/c.yaml"),
            line(r"run\.name: YAML reads 1e3 as the number 1000\.0, not a string: quote it \(\"1e3\"\) "
                 r"\(\S+/c\.yaml:3\)"),
            setup=files(**{"c.yaml": "run:\n\n  name: 1e3\n"})),
    Hostile("yaml-path-2024", train("{dir}/c.yaml"),
            line(r"data\.path: YAML reads 2024 as the number 2024, not a string: quote it \(\"2024\"\) "
                 r"\(\S+/c\.yaml:3\)"),
            setup=files(**{"c.yaml": "data:\n  source: text\n  path: 2024\n"})),

    # 4. empty paths, paths through files
    Hostile("empty-run-dir", train("tiny", "--run.dir=", run_dir=False),
            line(r"run\.dir: must be a non-empty path, got '' \(null unsets it\)")),
    Hostile("blank-run-dir", train("tiny", "--run.dir=   ", run_dir=False),
            line(r"run\.dir: must be a non-empty path, got '   ' \(null unsets it\)")),
    Hostile("yaml-empty-run-dir", train("{dir}/c.yaml", run_dir=False),
            line(r"run\.dir: must be a non-empty path, got '' \(null unsets it\)"),
            setup=files(**{"c.yaml": "run:\n  dir: ''\n"})),
    Hostile("empty-data-path", train("tiny", "--data.source=text", "--data.path="),
            line(r"data\.path: must be a non-empty path, got '' \(null unsets it\)")),
    Hostile("empty-cache-dir", train("tiny", "--data.cache_dir= "),
            line(r"data\.cache_dir: must be a non-empty path, got ' ' \(null unsets it\)")),
    Hostile("empty-tokenizer", train("tiny", "--data.tokenizer="),
            line(r"data\.tokenizer: must be a non-empty path, got '' \(null unsets it\)")),
    Hostile("empty-mixture-prefix", train("tiny", "--data.source=megatron", "--data.mixture={'': 1}"),
            line(r"data\.mixture\[''\]: must be a non-empty path, got ''")),
    Hostile("run-dir-is-a-file", train("tiny", "--run.dir={dir}/blocker", run_dir=False),
            line(r"run\.dir: \S+/blocker is a file, not a directory"), setup=files(blocker="x\n")),
    Hostile("run-dir-under-a-file", train("tiny", "--run.dir={dir}/blocker/deeper/run", run_dir=False),
            line(r"run\.dir: \S+/blocker/deeper/run is under \S+/blocker, which is a file, not a directory"),
            setup=files(blocker="x\n")),
    Hostile("data-path-under-a-file", train("tiny", "--data.source=text", "--data.path={dir}/blocker/corpus.txt"),
            line(r"data\.path: \S+/blocker/corpus\.txt does not exist \(\S+/blocker is a file, not a directory\)"),
            setup=files(blocker="x\n")),
    Hostile("cache-dir-under-a-file", train("tiny", "--data.cache_dir={dir}/blocker/cache"),
            line(r"data\.cache_dir: \S+/blocker/cache is under \S+/blocker, which is a file, not a directory"),
            setup=files(blocker="x\n")),
    Hostile("megatron-prefix-is-a-directory", train("tiny", "--data.source=megatron", "--data.path={dir}/p"),
            line(r"data\.path: \S+/p\.idx is not a file"),
            setup=files(**{"p.idx__x": "", "p.bin": ""})),

    # 5. duplicate keys
    Hostile("duplicate-key", train("{dir}/c.yaml"),
            line(r"optim\.lr: duplicate key in \S+/c\.yaml \(lines 2 and 4; give it once\)"),
            setup=files(**{"c.yaml": "optim:\n  lr: 0.01\n  eps: 1.0e-8\n  lr: 0.02\n"})),
    Hostile("duplicate-section", train("{dir}/c.yaml"),
            line(r"train: duplicate section in \S+/c\.yaml \(lines 1 and 5; give it once\)"),
            setup=files(**{"c.yaml": "train:\n  steps: 5\noptim:\n  lr: 0.01\ntrain:\n  seed: 3\n"})),
    Hostile("duplicate-nested-key", train("{dir}/c.yaml"),
            line(r"data\.mixture\['/d/a'\]: duplicate key in \S+/c\.yaml \(lines 4 and 6; give it once\)"),
            setup=files(**{"c.yaml": "data:\n  source: megatron\n  mixture:\n"
                                     "    /d/a: 1\n    /d/b: 2\n    /d/a: 3\n"})),

    # 6. undecodable bytes, YAML syntax
    Hostile("config-not-utf8", train("{dir}/c.yaml"),
            line(r"\S+/c\.yaml: not UTF-8 text \(byte 0xe9 at offset 16\)"),
            setup=files(**{"c.yaml": b"run:\n  name: caf\xe9\n"})),
    Hostile("run-dir-config-not-utf8", train("{dir}/old", run_dir=False),
            line(r"\S+/old/config\.yaml: not UTF-8 text \(byte 0xff at offset 20\)"),
            setup=files(**{"old__config.yaml": b"train:\n  steps: 5\n# \xff\xfe\n"})),
    Hostile("yaml-syntax", train("{dir}/c.yaml"),
            line(r"\S+/c\.yaml:3:1: invalid YAML: expected ',' or '\]', but got '<stream end>' "
                 r"\(while parsing a flow sequence\)"),
            setup=files(**{"c.yaml": "log:\n  profile_steps: [1, 2\n"})),
    Hostile("yaml-bad-indent", train("{dir}/c.yaml"),
            line(r"\S+/c\.yaml:3:3: invalid YAML: .*"),
            setup=files(**{"c.yaml": "optim:\n    lr: 0.01\n  eps: 1.0e-8\n"})),
    Hostile("yaml-control-character", train("{dir}/c.yaml"),
            line(r"\S+/c\.yaml:2: invalid YAML: unacceptable character #x0007 \(special characters are not allowed\)"),
            setup=files(**{"c.yaml": "optim:\n  lr: 0.01\x07\n"})),
    Hostile("yaml-two-documents", train("{dir}/c.yaml"),
            line(r"\S+/c\.yaml:3:1: invalid YAML: but found another document "
                 r"\(expected a single document in the stream\)"),
            setup=files(**{"c.yaml": "optim:\n  lr: 0.01\n---\noptim:\n  lr: 0.02\n"})),
    Hostile("yaml-unsafe-tag", train("{dir}/c.yaml"),
            line(r"\S+/c\.yaml:2:7: invalid YAML: could not determine a constructor for the tag .*python/object.*"),
            setup=files(**{"c.yaml": "optim:\n  lr: !!python/object/apply:os.system [true]\n"})),

    # 7. a device that is not there
    Hostile("cuda-not-visible", train("tiny", "--train.device=cuda"),
            line(r"train\.device: cuda requested but no CUDA device is visible \(torch .*\)"),
            env={"CUDA_VISIBLE_DEVICES": ""}),

    # 8. other holes
    Hostile("negative-seed", train("tiny", "--train.seed=-1"), line(r"train\.seed: must be non-negative, got -1")),
    Hostile("absurd-timeout", train("tiny", "--parallel.timeout_s=1e300"),
            line(r"parallel\.timeout_s: must be at most 1e\+09 seconds, got 1e\+300")),
    Hostile("absurd-threads", train("tiny", f"--train.num_threads={2**40}"),
            line(rf"train\.num_threads: must be at most 65536, got {2**40}")),
    Hostile("bool-rope-factor", train("tiny", "--model.rope_scaling={type: dynamic, factor: true}"),
            line(r"model\.rope_scaling: expected null or \{type: dynamic, factor: F >= 1\}, got .*")),
    Hostile("empty-config", ["megacpm", "train", "", RUN],
            line(r"CONFIG: must be a preset name, YAML file or run directory, got ''")),
    Hostile("control-character-in-key", train("tiny", "--train.st\neps=3"),
            line(r"'train\.st\\neps': unknown key \(known in 'train': .*\)")),
    Hostile("control-character-in-path", train("tiny", "--run.dir={dir}/a\nb", run_dir=False),
            line(r"run\.dir: must not contain control characters, got '\S+/a\\nb'")),
    # A byte that is not UTF-8 in a path on the command line (Python holds it as a surrogate).
    Hostile("non-utf8-run-dir", train("tiny", "--run.dir={dir}/run\udcff", run_dir=False),
            line(r"run\.dir: not valid UTF-8 \(byte 0xff at position \d+\); .*use a UTF-8 name")),
    Hostile("non-utf8-run-name", train("tiny", "--run.name=a\udcffb"),
            line(r"run\.name: not valid UTF-8 \(byte 0xff at position 1\); .*use a UTF-8 name")),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_config(case, tmp_path):
    run_hostile(case, tmp_path)
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "runs").exists()  # no default run directory either
