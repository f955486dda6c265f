"""The training loop's callbacks, in-process on a model of a few thousand parameters: which steps log,
evaluate and save; stopping on SIGTERM; divergence; that any metric train_step returns reaches the
sinks; the profiler's traces; Weights & Biases (offline, when the wandb package is installed)."""
import json
import os
import random
import signal
import struct
import sys
import time
import types

import pytest

from megacpm.config import ConfigError, load_config
from megacpm.io.run_dir import METRICS_FILE, PROFILE_DIR, TENSORBOARD_DIR, read_metrics
from megacpm.train.callbacks import Callback, CallbackList, WandB, trace_path
from megacpm.train.trainer import Trainer, TrainingDiverged

WORDS = ["alpha", "beta", "gamma", "delta", "train", "model", "loss", "step", "token", "layer", "norm", "value"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text corpus and its cache dir (the tokenizer is trained once for the module)."""
    root = tmp_path_factory.mktemp("callbacks-corpus")
    rng = random.Random(0)
    docs = ["\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(8)) for _ in range(60)]
    (root / "corpus.txt").write_text("\n\n\n".join(docs))
    return root


def make_config(run_dir, corpus, *overrides):
    return load_config("tiny", [
        "--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
        "--model.num_attention_heads=2", "--model.num_key_value_heads=2", "--model.vocab_size=300",
        "--model.dim_model_base=8", "--train.seq_len=16", "--train.global_batch_size=2",
        "--train.micro_batch_size=2", "--train.eval_batches=1", "--train.steps=6", "--train.log_interval=100",
        "--data.source=text", f"--data.path={corpus / 'corpus.txt'}", f"--data.cache_dir={corpus / 'cache'}",
        "--data.val_fraction=0.2", "--checkpoint.keep=0", "--log.tensorboard=false", "--log.progress=false",
        "--log.nvml=false", f"--run.dir={run_dir}", *overrides])


class Recorder(Callback):
    """Every hook call, as (hook, step, ...)."""

    def __init__(self):
        self.calls = []

    def on_train_start(self, trainer):
        self.calls.append(("start", trainer.state.step))

    def on_step_end(self, trainer, step, metrics):
        self.calls.append(("step", step))

    def on_log(self, trainer, record):
        self.calls.append(("log", record["step"]))

    def on_evaluate(self, trainer, step, eval_metrics):
        self.calls.append(("evaluate", step, eval_metrics["eval_loss"]))

    def on_checkpoint(self, trainer, step, path):
        self.calls.append(("checkpoint", step, path.name))

    def on_train_end(self, trainer, result):
        self.calls.append(("end", result))

    def steps(self, hook):
        return [call[1] for call in self.calls if call[0] == hook]


def run(cfg, *callbacks, trainer_class=Trainer):
    trainer = trainer_class(cfg, print_fn=lambda text: None)
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer, trainer.run()


def checkpoint_names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


def latest(run_dir):
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


# -- the callback list ------------------------------------------------------------------------------
def test_hooks_default_to_no_ops_and_the_list_calls_them_in_order():
    order = []

    class Named(Callback):
        def __init__(self, name):
            self.name = name

        def on_step_end(self, trainer, step, metrics):
            order.append((self.name, step))

        def record_fields(self, trainer, step):
            return {self.name: step}

    base = Callback()
    base.on_train_start(None), base.on_step_end(None, 1, {}), base.on_log(None, {"step": 1})
    base.on_evaluate(None, 1, {}), base.on_checkpoint(None, 1, None), base.on_train_end(None, None)
    with base.step_context(None, 1):
        pass
    assert base.record_fields(None, 1) == {}
    callbacks = CallbackList([Named("a"), Named("b"), Callback()])
    callbacks.on_step_end(None, 3, {})
    assert order == [("a", 3), ("b", 3)]
    assert callbacks.record_fields(None, 3) == {"a": 3, "b": 3}


# -- cadence ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_log_eval_and_checkpoint_cadence_includes_the_last_step(tmp_path, corpus, async_save, capsys):
    cfg = make_config(tmp_path, corpus, "--train.steps=7", "--train.log_interval=3", "--train.eval_interval=3",
                      "--checkpoint.interval=2", f"--checkpoint.async_save={str(async_save).lower()}")
    recorder = Recorder()
    trainer, result = run(cfg, recorder)
    assert result.status == "completed" and result.step == 7
    assert recorder.steps("step") == list(range(1, 8))
    assert recorder.steps("log") == [1, 3, 6, 7]
    assert recorder.steps("evaluate") == [3, 6, 7]
    assert recorder.steps("checkpoint") == [2, 4, 6, 7]
    assert checkpoint_names(tmp_path) == ["step_2", "step_4", "step_6", "step_7"] and latest(tmp_path) == "step_7"
    assert trainer.pending is None  # every background save was published
    assert recorder.calls[0] == ("start", 0) and recorder.calls[-1] == ("end", result)

    records = read_metrics(tmp_path)
    steps = [r["step"] for r in records if "loss" in r]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert steps == [1, 3, 6, 7] and sorted(evals) == [3, 6, 7]
    assert result.last_eval_loss == evals[7] and result.last_loss == records[-2]["loss"]
    step_record = records[0]
    assert list(step_record) == ["step", "loss", "grad_norm", "lr", "tokens", "tokens_per_sec"]
    assert step_record["tokens"] == 2 * 16 and records[-2]["tokens"] == 7 * 2 * 16
    assert all(set(r) == {"step", "eval_loss"} for r in records if "eval_loss" in r)
    out = capsys.readouterr().out
    assert "training " in out and "step 7/7 | loss" in out and "step 7: eval_loss" in out


def test_no_eval_batches_no_evaluation_and_interval_zero_saves_only_the_end(tmp_path, corpus):
    cfg = make_config(tmp_path, corpus, "--train.steps=4", "--train.eval_batches=0", "--checkpoint.interval=0")
    recorder = Recorder()
    _, result = run(cfg, recorder)
    assert recorder.steps("evaluate") == [] and result.last_eval_loss is None
    assert recorder.steps("checkpoint") == [4] and checkpoint_names(tmp_path) == ["step_4"]
    assert recorder.steps("log") == [1, 4]


# -- stopping ---------------------------------------------------------------------------------------
class SignalAt(Callback):
    """Sends ``sig`` to this process just before the step ``step`` runs."""

    def __init__(self, step, sig=signal.SIGTERM):
        self.step, self.sig = step, sig

    def on_step_end(self, trainer, step, metrics):
        if step == self.step - 1:
            os.kill(os.getpid(), self.sig)


def test_sigterm_saves_the_step_and_returns_interrupted_then_resumes(tmp_path, corpus, capsys):
    before = signal.getsignal(signal.SIGTERM)
    cfg = make_config(tmp_path, corpus, "--checkpoint.interval=100", "--train.log_interval=1")
    recorder = Recorder()
    trainer, result = run(cfg, SignalAt(3), recorder)
    # The signal arrived during step 2's callbacks, after checkpointing had looked at it: step 3 saves.
    assert result.status == "interrupted" and result.step == 3
    assert checkpoint_names(tmp_path) == ["step_3"] and latest(tmp_path) == "step_3"
    assert recorder.steps("checkpoint") == [3] and recorder.steps("step") == [1, 2, 3]
    assert recorder.calls[-1] == ("end", result)
    out = capsys.readouterr().out
    assert f"SIGTERM: saved {tmp_path / 'checkpoints' / 'step_3'}; stopping at step 3" in out
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored

    _, resumed = run(make_config(tmp_path, corpus, "--checkpoint.interval=100", "--train.log_interval=1"))
    assert resumed.status == "completed" and resumed.step == 6
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_sigint_asks_for_a_stop_like_sigterm(tmp_path, corpus, capsys):
    cfg = make_config(tmp_path, corpus, "--checkpoint.interval=100")
    _, result = run(cfg, SignalAt(2, signal.SIGINT))
    assert result.status == "interrupted" and result.step == 2 and latest(tmp_path) == "step_2"
    assert "SIGINT: saved" in capsys.readouterr().out


# -- divergence -------------------------------------------------------------------------------------
def test_a_non_finite_loss_raises_with_the_step_named_and_saves_nothing(tmp_path, corpus):
    recorder = Recorder()
    cfg = make_config(tmp_path, corpus, "--model.initializer_range=1e20", "--train.log_interval=1")
    with pytest.raises(TrainingDiverged, match=r"diverged at step 1: non-finite .*last checkpoint: none"):
        run(cfg, recorder)
    assert not (tmp_path / "checkpoints").exists()
    assert read_metrics(tmp_path) == []  # no record for the diverged step
    assert recorder.calls == [("start", 0), ("end", None)]


class DivergesAt(Trainer):
    """Raises TrainingDiverged at step ``diverge_at`` as train_step does on a non-finite loss."""

    diverge_at = 4

    def train_step(self, step):
        if step == self.diverge_at:
            raise TrainingDiverged(f"diverged at step {step}: non-finite loss (loss nan, grad_norm nan)")
        return super().train_step(step)


def test_divergence_publishes_the_earlier_background_save_and_not_its_own_step(tmp_path, corpus):
    before = signal.getsignal(signal.SIGTERM)
    cfg = make_config(tmp_path, corpus, "--checkpoint.interval=3", "--checkpoint.async_save=true",
                      "--train.log_interval=1", "--log.tensorboard=true")
    recorder = Recorder()
    with pytest.raises(TrainingDiverged, match="diverged at step 4"):
        run(cfg, recorder, trainer_class=DivergesAt)
    assert checkpoint_names(tmp_path) == ["step_3"] and latest(tmp_path) == "step_3"
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2, 3]
    assert recorder.calls[-1] == ("end", None) and signal.getsignal(signal.SIGTERM) is before
    assert sorted(tensorboard_scalars(tmp_path / TENSORBOARD_DIR)["train/loss"]) == [1, 2, 3]  # flushed, closed


# -- metrics reach every sink -----------------------------------------------------------------------
class ExtraMetric(Trainer):
    def train_step(self, step):
        return {**super().train_step(step), "tokens_seen_twice": 2.0 * self.state.tokens, "eval_like": 1.0}


def test_an_extra_metric_of_train_step_reaches_metrics_file_and_tensorboard(tmp_path, corpus):
    cfg = make_config(tmp_path, corpus, "--train.log_interval=2", "--log.tensorboard=true")
    run(cfg, trainer_class=ExtraMetric)
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 4, 6]
    assert all(r["tokens_seen_twice"] == 2.0 * r["tokens"] for r in records)
    scalars = tensorboard_scalars(tmp_path / TENSORBOARD_DIR)
    assert scalars["train/tokens_seen_twice"] == {1: 64.0, 2: 128.0, 4: 256.0, 6: 384.0}
    assert sorted(scalars["train/loss"]) == [1, 2, 4, 6] and sorted(scalars["eval/eval_loss"]) == [6]
    assert sorted(scalars["eval/eval_like"]) == [1, 2, 4, 6]  # TensorBoard's existing rule: eval* keys go to eval/


# -- profiler ---------------------------------------------------------------------------------------
def test_the_profiler_traces_exactly_the_chosen_steps(tmp_path, corpus):
    cfg = make_config(tmp_path, corpus, "--log.profile_steps=[2, 5, 99]")
    _, result = run(cfg)
    assert result.status == "completed"
    traces = sorted(p.name for p in (tmp_path / PROFILE_DIR).iterdir())
    assert traces == ["rank0_step2.pt.trace.json", "rank0_step5.pt.trace.json"]
    for step in (2, 5):
        trace = json.loads(trace_path(tmp_path / PROFILE_DIR, 0, step).read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        assert f"train_step {step}" in names and len(trace["traceEvents"]) > 10
        assert any(name and name.startswith("aten::") for name in names)  # the step's operators


# -- Weights & Biases -------------------------------------------------------------------------------
def read_wandb_records(path):
    """The protobuf records of a .wandb transaction log (LevelDB log format: 32 KiB blocks of
    [crc32 (4), length (2), type (1): full/first/middle/last] chunks, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, records, pending = path.read_bytes(), 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir):
    """{step: {key: value}} of every offline W&B run under RUN/wandb/, and the run ids."""
    history, ids = {}, set()
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in read_wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history.setdefault(record.history.step.num, {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
    return history, ids


def test_wandb_offline_run_logs_every_record_at_its_step_and_resumes_the_same_run(tmp_path, corpus, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    inits, real_init = [], wandb.init

    def spy_init(**kwargs):
        inits.append(kwargs)
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", spy_init)
    common = ["--log.wandb=true", "--log.wandb_mode=offline", "--log.wandb_project=megacpm-test",
              "--run.name=wb-test", "--train.log_interval=2", "--train.eval_interval=4", "--checkpoint.interval=2"]
    run(make_config(tmp_path, corpus, "--train.steps=4", *common), trainer_class=ExtraMetric)
    init = inits[0]
    assert init["project"] == "megacpm-test" and init["name"] == "wb-test" and init["mode"] == "offline"
    assert init["dir"] == str(tmp_path) and init["resume"] == "allow"
    assert init["config"]["train"]["steps"] == 4 and init["config"]["log"]["wandb"] is True

    # W&B names an offline run's directory by its start time to the second and the run id: a resume
    # within the same second would share (and lose) the first run's file, which no real resume does.
    started = int(time.time())
    while int(time.time()) == started:
        time.sleep(0.05)
    _, result = run(make_config(tmp_path, corpus, "--train.steps=6", *common), trainer_class=ExtraMetric)
    assert result.status == "completed" and inits[1]["id"] == init["id"]  # the resumed run continues it

    history, ids = wandb_history(tmp_path)
    assert ids == {init["id"]}
    assert sorted(history) == [1, 2, 4, 6]
    records = read_metrics(tmp_path)
    for record in records:
        logged = history[record["step"]]
        for key, value in record.items():
            if key != "step":
                assert logged[key] == pytest.approx(value), (record["step"], key)
    assert "tokens_seen_twice" in history[6] and "eval_loss" in history[4] and "eval_loss" in history[6]


class FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step):
        self.calls.append(("log", step, dict(data)))

    def finish(self, exit_code=0):
        self.calls.append(("finish", exit_code))


def fake_wandb(calls):
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun(calls)

    module.init = init
    return module


def test_wandb_on_other_ranks_does_nothing_and_a_failed_run_finishes_with_exit_code_1(tmp_path, corpus,
                                                                                        monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    silent = WandB(active=False)
    silent.on_train_start(None), silent.on_log(None, {"step": 1, "loss": 1.0}), silent.on_train_end(None, None)
    assert calls == []

    cfg = make_config(tmp_path, corpus, "--log.wandb=true", "--train.log_interval=1")
    with pytest.raises(TrainingDiverged):
        run(cfg, trainer_class=DivergesAt)
    assert calls[0][0] == "init" and calls[0][1]["name"] == cfg.run.name
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2, 3] and calls[-1] == ("finish", 1)
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_sec"} <= set(calls[1][2])
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == calls[0][1]["id"]


def test_wandb_missing_is_one_clear_config_error(tmp_path, corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    trainer = Trainer(make_config(tmp_path, corpus, "--log.wandb=true"), print_fn=lambda text: None)
    with pytest.raises(ConfigError, match="log.wandb is true but the wandb package is not installed: pip install wandb"):
        trainer.run()
    assert not (tmp_path / METRICS_FILE).exists()  # failed before any callback started
