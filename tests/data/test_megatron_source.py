"""data.source=megatron: training reads a Megatron indexed dataset in place, split by documents,
with the same sample stream whatever the layout."""
import numpy as np
import pytest

from megacpm.config import load_config
from megacpm.data import IndexedDatasetWriter, build_datasets, get_batch
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
    return load_config("tiny", [f"--data.source=megatron", f"--data.path={prefix}", f"--model.vocab_size={VOCAB}",
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
