"""Hostile input to the tools and to the data / branch paths, as a user types it: each row is one
real command (``megacpm ...`` or a tools/ script) and its promise (tests/reliability/hostile.py):
one line ``<prog>: error: ...``, no traceback, the directory byte-identical, no temporary left;
``megacpm runs`` over corrupt state files instead succeeds and says what it could not read.

The rows run side by side (each mostly imports torch) in one module-scoped fixture; each row's test
then reports its own outcome. The SIGTERM-during-preprocessing case has its own test below.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megacpm.config import ModelConfig
from megacpm.model import MiniCPM
from tests.reliability.hostile import Hostile, command, error_lines, run_hostile, snapshot, temporaries
from tests.support import cli_env

VOCAB = 101
SHARED: Dict[str, Path] = {}  # built once by the fixture: "run" (a megacpm run to branch from)
EOD = "<|endoftext|>"


# -- inputs ----------------------------------------------------------------------------------------
def model_config() -> ModelConfig:
    return ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, dim_model_base=16, tie_word_embeddings=True)


def hf_config() -> dict:
    cfg = model_config()
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "dim_model_base", "tie_word_embeddings", "scale_emb", "scale_depth", "rope_theta",
              "rms_norm_eps", "max_position_embeddings")
    return {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", **{k: getattr(cfg, k) for k in fields}}


def hf_tensors() -> dict:
    model = MiniCPM(model_config())
    model.init_weights(torch.Generator().manual_seed(0))
    return {"model." + k: v for k, v in model.state_dict().items()}


def hf_dir(config=None, config_bytes=None, tensors=None, weights_bytes=None):
    """A setup writing DIR/hf: config.json (edited, or raw bytes) and model.safetensors."""
    def setup(directory: Path) -> None:
        hf = directory / "hf"
        hf.mkdir()
        if config_bytes is not None:
            (hf / "config.json").write_bytes(config_bytes)
        else:
            (hf / "config.json").write_text(json.dumps({**hf_config(), **(config or {})}))
        if weights_bytes is not None:
            (hf / "model.safetensors").write_bytes(weights_bytes)
        else:
            save_file(tensors(hf_tensors()) if tensors else hf_tensors(), str(hf / "model.safetensors"))
    return setup


def without(key):
    def setup(directory: Path) -> None:
        hf_dir()(directory)
        config = json.loads((directory / "hf" / "config.json").read_text())
        del config[key]
        (directory / "hf" / "config.json").write_text(json.dumps(config))
    return setup


def truncated_weights(directory: Path) -> None:
    hf_dir()(directory)
    path = directory / "hf" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def reshaped(tensors):
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
    return tensors


def parent_run(directory: Path) -> None:
    shutil.copytree(SHARED["run"], directory / "parent")


def branched_ok(directory: Path, before) -> None:
    after = snapshot(directory)
    assert {k: v for k, v in after.items() if not k.startswith("new")} == before  # the parent only read
    lineage = json.loads((directory / "new" / "lineage.json").read_text())
    assert lineage["overrides"] == ["--optim.lr=0.001", "--train.steps=10"]


def runs_tree(lineages: Dict[str, bytes], metrics: bytes = b"", latest: bytes = b"") -> callable:
    """ROOT/good (a run) and ROOT/<name> (a branch of it) whose lineage.json holds the bytes."""
    def setup(directory: Path) -> None:
        (directory / "good").mkdir()
        (directory / "good" / "config.yaml").write_text("run: {}\n")
        (directory / "good" / "metrics.jsonl").write_bytes(
            b'{"step": 1, "loss": 2.5, "tokens": 100}\n' + metrics)
        if latest:
            (directory / "good" / "checkpoints").mkdir()
            (directory / "good" / "checkpoints" / "latest").write_bytes(latest)
        for name, content in lineages.items():
            (directory / name).mkdir()
            (directory / name / "config.yaml").write_text("run: {}\n")
            (directory / name / "lineage.json").write_bytes(content)
    return setup


CORRUPT_LINEAGES = {"torn": b'{"parent_run": "/x", "st', "binary": b"\x89PNG\r\n\x1a\n\xff\x00",
                    "array": b"[1, 2]", "no-parent": b'{"step": 3}'}


def corpus(dtype=np.uint16, code=None, negative=False):
    """DIR/c.bin / c.idx: 6 documents of 40 tokens (MMIDIDX v1, written from the format here)."""
    def setup(directory: Path) -> None:
        tokens = np.tile(np.arange(1, 41), 6).astype(dtype)
        if negative:
            tokens[45] = -5
        lengths = np.full(6, 40, dtype="<i4")
        pointers = (np.arange(6, dtype="<i8") * 40 * np.dtype(dtype).itemsize).astype("<i8")
        doc_idx = np.arange(7, dtype="<i8")
        (directory / "c.bin").write_bytes(tokens.tobytes())
        codes = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4, np.dtype(np.float32): 7}
        header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code or codes[np.dtype(dtype)], 6, 7)
        (directory / "c.idx").write_bytes(header + lengths.tobytes() + pointers.tobytes() + doc_idx.tobytes())
    return setup


def train_on(path: str, source: str = "megatron"):
    return ["megacpm", "train", "tiny", f"--data.source={source}", f"--data.path={path}", "--train.steps=1",
            "--train.seq_len=16", "--run.dir={dir}/run", "--data.cache_dir={dir}/cache"]


def _tokenizer_json() -> str:
    if "tokenizer" not in SHARED:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOD], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(["lorem ipsum dolor sit amet " * 20, "hello world"], trainer=trainer)
        SHARED["tokenizer"] = tokenizer.to_str()
    return SHARED["tokenizer"]


def preprocess_inputs(directory: Path) -> None:
    (directory / "tok.json").write_text(_tokenizer_json())
    (directory / "docs.jsonl").write_text('{"text": "hello world"}\n{"text": "lorem ipsum"}\n')
    (directory / "bad.txt").write_bytes(b"first document\n\n\nsecond \xff\xfe document\n")
    (directory / "a-file").write_text("not a directory")


def metrics_file(content: bytes):
    def setup(directory: Path) -> None:
        (directory / "run").mkdir()
        (directory / "run" / "metrics.jsonl").write_bytes(content)
        (directory / "a-file").write_text("not a directory")
    return setup


GOOD_METRICS = b"".join(json.dumps({"step": s, "loss": 3.0 - s / 10, "lr": 0.01}).encode() + b"\n" for s in range(5))
CONVERT = ["convert_checkpoint", "--from", "hf", "--to", "megacpm", "--input", "{dir}/hf", "--output", "{dir}/out"]

CASES = [
    # 1. the converter: foreign or broken Hugging Face directories, bad arguments
    Hostile("convert: llama config.json", CONVERT,
            r"hf/config\.json: model_type 'llama' is not MiniCPM \(expected 'minicpm'\)",
            setup=hf_dir({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})),
    Hostile("convert: no muP fields", CONVERT, r"hf/config\.json: missing scale_emb .*muP", setup=without("scale_emb")),
    Hostile("convert: config.json not JSON", CONVERT, r"hf/config\.json: not valid JSON",
            setup=hf_dir(config_bytes=b'{"hidden_size": 64,')),
    Hostile("convert: config.json not UTF-8", CONVERT, r"hf/config\.json: not UTF-8 text \(byte 0xff at offset 1\)",
            setup=hf_dir(config_bytes=b"{\xff}")),
    Hostile("convert: non-finite field", CONVERT, r"hf/config\.json: scale_depth must be finite",
            setup=hf_dir({"scale_depth": math.inf})),
    Hostile("convert: truncated safetensors", CONVERT, r"hf/model\.safetensors: cannot be read",
            setup=truncated_weights),
    Hostile("convert: tensor of the wrong shape", CONVERT,
            r"hf/model\.safetensors: tensor model\.layers\.0\.mlp\.up_proj\.weight has shape \(95, 64\)",
            setup=hf_dir(tensors=reshaped)),
    Hostile("convert: --output exists", [*CONVERT[:-1], "{dir}/hf"], r"--output: .*hf: already exists",
            setup=hf_dir()),
    Hostile("convert: --output under a file", [*CONVERT[:-1], "{dir}/hf/config.json/out"],
            r"--output: .*config\.json is a file, not a directory", setup=hf_dir()),
    Hostile("convert: --input missing", CONVERT, r"--input: .*hf: no such directory"),
    Hostile("convert: --tp 0", [*CONVERT, "--tp", "0"], r"--tp: must be >= 1, got 0", setup=hf_dir()),
    Hostile("convert: --pp -1", [*CONVERT, "--pp", "-1"], r"--pp: must be >= 1, got -1", setup=hf_dir()),
    Hostile("convert: --tp not dividing the heads", [*CONVERT, "--tp", "3"],
            r"--tp 3 --pp 1: parallel\.tp: 3 does not divide model\.num_attention_heads 4", setup=hf_dir()),
    Hostile("convert: --max-shard-size not a size",
            ["convert_checkpoint", "--from", "megacpm", "--to", "hf", "--input", "{dir}", "--output", "{dir}/o",
             "--max-shard-size", "lots"], r"argument --max-shard-size: 'lots' is not a size"),
    Hostile("convert: megacpm -> hf from a non-checkpoint",
            ["convert_checkpoint", "--from", "megacpm", "--to", "hf", "--input", "{dir}/hf", "--output", "{dir}/o"],
            r"neither a run directory \(config\.yaml\) nor a checkpoint", setup=hf_dir()),
    # 2. megacpm branch: the model's shape is the checkpoint's
    Hostile("branch: hidden_size", ["megacpm", "branch", "{dir}/parent", "{dir}/new", "--model.hidden_size=128"],
            r"--model\.hidden_size=128: the checkpoint .* has model\.hidden_size = 64, the branch asks for 128",
            setup=parent_run),
    Hostile("branch: a smaller vocabulary",
            ["megacpm", "branch", "{dir}/parent", "{dir}/new", "--model.vocab_size=64"],
            r"--model\.vocab_size=64: the checkpoint .* has model\.vocab_size = \d+, the branch asks for 64; .*never "
            r"shrink it", setup=parent_run),
    Hostile("branch: a new LR and length are what branching is for",
            ["megacpm", "branch", "{dir}/parent", "{dir}/new", "--optim.lr=0.001", "--train.steps=10"],
            r"branched .*new", setup=parent_run, check=branched_ok, ok=True),
    # 3. megacpm runs: corrupt state files are named, the listing goes on
    Hostile("runs: corrupt lineage.json", ["megacpm", "runs", "{dir}"],
            r"(?sm)(?=.*^torn  \(no checkpoint, lineage unreadable: not valid JSON)"
            r"(?=.*^binary  \(no checkpoint, lineage unreadable: not UTF-8)"
            r"(?=.*^array  \(no checkpoint, lineage unreadable: a JSON list, not an object\))"
            r"(?=.*^no-parent  \(no checkpoint, lineage unreadable: no parent_run\))"
            r"(?=.*^good  \(no checkpoint, 100 tokens, loss 2\.5000\))", setup=runs_tree(CORRUPT_LINEAGES), ok=True),
    Hostile("runs: binary metrics and latest", ["megacpm", "runs", "{dir}"],
            r"good  \(no checkpoint, 100 tokens, loss 2\.5000, checkpoints/latest unreadable\)",
            setup=runs_tree({}, metrics=b"\xff\xfe\x00garbage\n", latest=b"\xff\xff"), ok=True),
    # 4. datasets: float token ids, negative ids, text that is not UTF-8
    Hostile("data: float token dtype", train_on("{dir}/c"),
            r"c\.idx: dtype code 7 \(float32\) is not an integer type", setup=corpus(np.float32)),
    Hostile("data: negative token id", train_on("{dir}/c"),
            r"c\.bin: holds token id -5 \(token 45\), outside model\.vocab_size", setup=corpus(np.int32, negative=True)),
    Hostile("data: text not UTF-8", train_on("{dir}/bad.txt", "text"),
            r"data\.path: .*bad\.txt: not UTF-8 text \(byte 0xff at offset 24\)", setup=preprocess_inputs),
    # 5. preprocess_data: unusable output paths, undecodable text
    Hostile("preprocess: output under a file",
            ["preprocess_data", "--input", "{dir}/docs.jsonl", "--tokenizer", "{dir}/tok.json",
             "--output-prefix", "{dir}/a-file/ds"], r"--output-prefix: .*a-file is a file, not a directory",
            setup=preprocess_inputs),
    Hostile("preprocess: output directory missing",
            ["preprocess_data", "--input", "{dir}/docs.jsonl", "--tokenizer", "{dir}/tok.json",
             "--output-prefix", "{dir}/no/such/ds"], r"--output-prefix: directory .*no/such does not exist",
            setup=preprocess_inputs),
    Hostile("preprocess: text input not UTF-8",
            ["preprocess_data", "--input", "{dir}/bad.txt", "--tokenizer", "{dir}/tok.json",
             "--output-prefix", "{dir}/ds"], r"bad\.txt: not UTF-8 text \(byte 0xff at offset 24\)",
            setup=preprocess_inputs),
    # 6. the other tools: OSError and UnicodeDecodeError as PATH: cause
    Hostile("plot_run: metrics not UTF-8", ["plot_run", "{dir}/run"],
            r"metrics\.jsonl: not UTF-8 text \(byte 0xff at offset 0\)", setup=metrics_file(b"\xff\xfe")),
    Hostile("plot_run: output under a file", ["plot_run", "{dir}/run", "--output", "{dir}/a-file/x.png"],
            r"cannot write .*a-file/x\.png: a part of the path is a file", setup=metrics_file(GOOD_METRICS)),
    Hostile("scaling_law: csv not UTF-8", ["scaling_law", "fit", "--csv", "{dir}/p.csv"],
            r"p\.csv: not UTF-8 text \(byte 0xff at offset 2\)",
            setup=lambda d: (d / "p.csv").write_bytes(b"N,\xff,loss\n1,2,3\n")),
]
if os.geteuid() != 0:  # root writes anywhere: the permission rows need an ordinary user
    def read_only(directory: Path) -> None:
        preprocess_inputs(directory)
        (directory / "ro").mkdir()
        (directory / "ro").chmod(0o555)

    CASES.append(Hostile("preprocess: read-only output directory",
                         ["preprocess_data", "--input", "{dir}/docs.jsonl", "--tokenizer", "{dir}/tok.json",
                          "--output-prefix", "{dir}/ro/ds"], r"--output-prefix: directory .*ro is not writable",
                         setup=read_only))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{case name: None or the exception its checks raised}, the rows run side by side."""
    root = tmp_path_factory.mktemp("hostile")
    hf_dir()(root)
    result = subprocess.run(command(CONVERT, root), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    SHARED["run"] = root / "out"
    _tokenizer_json()

    def run(case: Hostile):
        try:
            run_hostile(case, root / "cases" / case.name.replace(" ", "_").replace(":", "").replace("/", "_"))
        except Exception as exc:  # reported by the row's own test
            return exc
        return None

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(zip((case.name for case in CASES), pool.map(run, CASES)))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_row(outcomes, case):
    if outcomes[case.name] is not None:
        raise outcomes[case.name]


# -- 5. SIGTERM while preprocessing -----------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_preprocessing_leaves_nothing(tmp_path, workers):
    (tmp_path / "tok.json").write_text(_tokenizer_json())
    line = json.dumps({"text": "lorem ipsum dolor sit amet, hello world " * 8}) + "\n"
    (tmp_path / "big.jsonl").write_text(line * 200_000)  # about 1 minute of tokenizing: never finishes here
    out = tmp_path / "out"
    out.mkdir()
    argv = command(["preprocess_data", "--input", "{dir}/big.jsonl", "--tokenizer", "{dir}/tok.json",
                    "--output-prefix", "{dir}/out/ds", "--workers", str(workers)], tmp_path)
    process = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in out.glob(".tmp-*")):  # tokens are being written
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr + stdout
    assert error_lines(stderr) == ["preprocess_data: error: interrupted; no output written"], stderr
    assert list(out.iterdir()) == [] and not temporaries(tmp_path)
