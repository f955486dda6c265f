"""data.source=megatron: training reads a Megatron indexed dataset in place, split by documents,
with the same sample stream whatever the layout."""
import numpy as np
import pytest

from megacpm.config import load_config
from megacpm.data import DataError, IndexedDatasetWriter, build_datasets, get_batch
from tests.support import run_cli
from tests.train.test_training_run import losses

VOCAB, EOD = 512, 511


def write_corpus(prefix, documents=60, seed=0):
    """Documents of random length, each ending with EOD (as preprocess_data --append-eod writes them)."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(0, EOD, size=int(rng.integers(20, 200))), EOD) for _ in range(documents)]
    with IndexedDatasetWriter(prefix, vocab_size=VOCAB) as writer:
        for doc in docs:
            writer.add_sequences([doc])
            writer.end_document()
    return docs


def config(prefix, *extra):
    return load_config("tiny", ["--data.source=megatron", f"--data.path={prefix}", f"--model.vocab_size={VOCAB}",
                                "--train.seq_len=32", "--data.val_fraction=0.1", *extra])


def test_samples_are_windows_of_the_training_documents(tmp_path):
    docs = write_corpus(tmp_path / "corpus")
    cfg = config(tmp_path / "corpus")
    data = build_datasets(cfg.data, vocab_size=VOCAB, seq_len=32, seed=1)
    assert data.train_docs + data.valid_docs == len(docs) and data.valid_docs == 6
    assert data.train_tokens + data.valid_tokens == sum(len(d) for d in docs)
    assert isinstance(data.train.tokens.base, np.memmap) or isinstance(data.train.tokens, np.memmap)
    train_stream = np.concatenate([docs[d] for d in range(len(docs))
                                   if not any(np.array_equal(docs[d], data.valid.tokens[s:s + n])
                                              for s, n in zip(data.valid.doc_starts, data.valid.doc_lengths))])
    text = train_stream.tobytes()
    batch = get_batch(data.train, 0, 16).numpy()
    for row in batch:  # every sample lies in the training documents (a window across document ends)
        assert row.shape == (33,)
        if EOD not in row[:-1]:
            assert row.astype(train_stream.dtype).tobytes() in text


def test_out_of_vocabulary_ids_are_one_clear_error(tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = config(tmp_path / "corpus")
    with pytest.raises(Exception, match="outside model.vocab_size 256"):
        build_datasets(cfg.data, vocab_size=256, seq_len=32, seed=1)


def test_negative_token_ids_are_one_clear_error(tmp_path):
    """An int32 corpus (a vocabulary over 65,536) can hold negative ids: refused before training."""
    with IndexedDatasetWriter(tmp_path / "corpus", vocab_size=70_000) as writer:
        for _ in range(10):
            writer.add_document(np.arange(1, 50))
    path = tmp_path / "corpus.bin"
    tokens = np.fromfile(path, dtype=np.int32)
    tokens[60] = -3
    tokens.tofile(path)
    cfg = config(tmp_path / "corpus")
    with pytest.raises(DataError, match=r"corpus\.bin: holds token id -3 \(token 60\), outside model\.vocab_size"):
        build_datasets(cfg.data, vocab_size=70_000, seq_len=32, seed=1)


@pytest.mark.slow
def test_training_on_a_megatron_corpus_through_the_cli(tmp_path):
    write_corpus(tmp_path / "corpus", documents=200)
    args = ["train", "tiny", f"--run.dir={tmp_path / 'run'}", "--data.source=megatron", f"--data.path={tmp_path / 'corpus'}",
            f"--model.vocab_size={VOCAB}", "--model.hidden_size=64", "--model.intermediate_size=160",
            "--model.num_hidden_layers=2", "--model.dim_model_base=16", "--train.seq_len=32",
            "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.steps=4", "--train.log_interval=1",
            "--train.eval_batches=1", "--log.tensorboard=false", "--log.progress=false"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]
    missing = run_cli(*args[:3], "--data.source=megatron", f"--data.path={tmp_path / 'nothing'}")
    assert missing.returncode == 2 and "nothing.idx does not exist" in missing.stderr


def test_a_mixture_blends_the_datasets_by_weight(tmp_path):
    write_corpus(tmp_path / "a", seed=1)
    write_corpus(tmp_path / "b", seed=2)
    cfg = load_config("tiny", ["--data.source=megatron", f"--model.vocab_size={VOCAB}", "--data.val_fraction=0.1",
                               f"--data.mixture={{{tmp_path / 'a'}: 3, {tmp_path / 'b'}: 1}}"])
    data = build_datasets(cfg.data, vocab_size=VOCAB, seq_len=32, seed=1)
    single_a = build_datasets(config(tmp_path / "a").data, vocab_size=VOCAB, seq_len=32, seed=1).train
    single_b = build_datasets(config(tmp_path / "b").data, vocab_size=VOCAB, seq_len=32, seed=1).train
    batch = get_batch(data.train, 0, 8).numpy()
    # The quota order for weights 3:1 (worked by hand: b becomes eligible first at the 4th sample,
    # a ties b at the 3rd and wins as the first) is a, a, a, b, a, a, a, b; each sample is that
    # dataset's next one.
    taken = {"a": 0, "b": 0}
    for row, name in zip(batch, ["a", "a", "a", "b", "a", "a", "a", "b"]):
        source = single_a if name == "a" else single_b
        assert np.array_equal(row, source[taken[name]]), name
        taken[name] += 1


@pytest.mark.slow
def test_a_branch_switches_the_mixture_at_its_first_step(tmp_path, capfd):
    from megacpm.train.trainer import Trainer
    from megacpm.checkpoint import latest_checkpoint

    write_corpus(tmp_path / "a", documents=200, seed=1)
    write_corpus(tmp_path / "b", documents=200, seed=2)
    common = ["--data.source=megatron", f"--model.vocab_size={VOCAB}", "--model.hidden_size=64",
              "--model.intermediate_size=160", "--model.num_hidden_layers=2", "--model.dim_model_base=16",
              "--train.seq_len=32", "--train.global_batch_size=8", "--train.micro_batch_size=4",
              "--train.eval_batches=1", "--log.tensorboard=false", "--log.progress=false"]
    parent = tmp_path / "parent"
    assert run_cli("train", "tiny", f"--run.dir={parent}", f"--data.path={tmp_path / 'a'}", "--train.steps=3",
                   *common).returncode == 0
    branch = tmp_path / "branch"
    result = run_cli("branch", parent, branch, "--data.path=null", f"--data.mixture={{{tmp_path / 'b'}: 1}}",
                     "--train.steps=5")
    assert result.returncode == 0, result.stderr
    cfg = load_config(str(branch))
    trainer = Trainer(cfg, print_fn=lambda text: None)
    trainer._resume(latest_checkpoint(branch))
    assert trainer.state.consumed_samples == 24 and trainer.state.data_start == 24
    expected = get_batch(build_datasets(cfg.data, VOCAB, 32, cfg.train.seed).train, 0, 8)
    batch = trainer.next_batch()  # the new mixture from its first sample
    assert np.array_equal(batch.input_ids, expected[:, :-1]) and np.array_equal(batch.labels, expected[:, 1:])
    assert run_cli("train", str(branch)).returncode == 0


def test_epoch_indices_are_cached_under_a_key_of_what_defines_them(tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = config(tmp_path / "corpus", f"--data.cache_dir={tmp_path / 'cache'}")
    first = build_datasets(cfg.data, vocab_size=VOCAB, seq_len=32, seed=1).train
    expected = get_batch(first, 0, 20)
    files = sorted((tmp_path / "cache" / "indices").glob("*.npy"))
    assert len(files) == 3  # doc_order, sample_idx, sample_order of epoch 0
    again = build_datasets(cfg.data, vocab_size=VOCAB, seq_len=32, seed=1).train
    assert np.array_equal(get_batch(again, 0, 20), expected)
    assert isinstance(again.epoch_index(0).sample_order, np.memmap)  # loaded, not rebuilt
    build_datasets(cfg.data, vocab_size=VOCAB, seq_len=32, seed=2).train.epoch_index(0)
    assert len(list((tmp_path / "cache" / "indices").glob("*.npy"))) == 6  # another seed, another key


@pytest.mark.slow
def test_resume_on_another_data_parallel_size_continues_the_stream(tmp_path):
    from tests.support import run_torchrun

    write_corpus(tmp_path / "corpus", documents=200)
    args = [f"--data.path={tmp_path / 'corpus'}", "--data.source=megatron", f"--model.vocab_size={VOCAB}",
            "--model.hidden_size=64", "--model.intermediate_size=160", "--model.num_hidden_layers=2",
            "--model.dim_model_base=16", "--train.seq_len=32", "--train.global_batch_size=8",
            "--train.micro_batch_size=2", "--train.steps=4", "--train.log_interval=1", "--train.eval_batches=0",
            "--checkpoint.interval=2", "--log.tensorboard=false", "--log.progress=false"]
    assert run_cli("train", "tiny", f"--run.dir={tmp_path / 'one'}", *args).returncode == 0
    resumed = tmp_path / "dp"
    assert run_cli("train", "tiny", f"--run.dir={resumed}", *args, "--train.steps=2").returncode == 0
    # The schedule depends on train.steps: the first leg ran with steps=2, so compare its steps 1-2
    # only, then let a DP=2 run take the checkpoint at step 2 to step 4 with the full schedule.
    (resumed / "config.yaml").unlink()
    result = run_torchrun(2, "train", "tiny", f"--run.dir={resumed}", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 ranks (tp 1 x pp 1 x dp 2)" in result.stdout
    reference, got = losses(tmp_path / "one"), losses(resumed)
    assert got[1] == reference[1] and got[2] == reference[2]
    assert got[3] == pytest.approx(reference[3], rel=1e-5) and got[4] == pytest.approx(reference[4], rel=1e-5)


def test_a_test_split_is_held_out_by_documents_without_moving_validation(tmp_path):
    write_corpus(tmp_path / "corpus", documents=100)
    plain = build_datasets(config(tmp_path / "corpus").data, vocab_size=VOCAB, seq_len=32, seed=1)
    split = build_datasets(config(tmp_path / "corpus", "--data.test_fraction=0.2").data,
                           vocab_size=VOCAB, seq_len=32, seed=1)
    assert plain.test is None and split.test.num_docs == 20
    spans = {name: set(zip(ds.doc_starts.tolist(), ds.doc_lengths.tolist()))
             for name, ds in (("train", split.train), ("valid", split.valid), ("test", split.test))}
    assert not (spans["train"] & spans["valid"] or spans["train"] & spans["test"] or spans["valid"] & spans["test"])
    assert sum(len(v) for v in spans.values()) == 100
    assert spans["valid"] == set(zip(plain.valid.doc_starts.tolist(), plain.valid.doc_lengths.tolist()))
