"""SFT and DPO under the parallel layouts: every layout logs the one-process run's metrics.

Each run is the real Trainer (data, objective, DPO's reference, evaluation, metrics.jsonl) on a tiny
MiniCPM and a small chat data set with its own small tokenizer. The reference is the one-process
run's metrics.jsonl; a layout must reproduce every step's record within 1e-4 (the loss, the
gradient norm, DPO's rewards, accuracies, margins and log-probabilities, and the eval_ metrics).

The runs share their spawned processes: one group per world size (1, 2 and 8) trains all of its
layouts one after the other, each in its own run directory, and the tests compare the files.
Also checked: a DPO run with the reference live (a frozen model scoring each batch) logs what the
precomputed reference gives, and each layout's precomputed table holds the one-process scores.
"""
import json
import random
import traceback
from pathlib import Path

import numpy as np
import pytest

from tests.distributed import run_distributed

pytestmark = pytest.mark.slow

STEPS = 4
TOKENIZER_VOCAB = 384  # bytes, the end token and merges (most words one token): model.vocab_size
WORDS = ("alpha beta gamma delta epsilon zeta sum add two three four five six seven eight nine ten good bad "
         "answer question list return value print the of and").split()
MODEL = ["--model.hidden_size=64", "--model.intermediate_size=128", "--model.num_hidden_layers=4",
         "--model.num_attention_heads=4", "--model.num_key_value_heads=2", f"--model.vocab_size={TOKENIZER_VOCAB}",
         "--model.dim_model_base=16"]
TRAIN = ["--train.seq_len=32", "--train.global_batch_size=8", "--train.micro_batch_size=2",
         f"--train.steps={STEPS}", "--train.log_interval=1", "--train.eval_interval=2", "--train.eval_batches=2",
         "--train.num_threads=1", "--data.val_fraction=0.2", "--optim.lr=0.02", "--optim.clip_grad=0.5",
         "--schedule.kind=constant", "--schedule.warmup_steps=0", "--checkpoint.interval=0",
         "--log.tensorboard=false", "--log.progress=false"]
KINDS = {
    "sft": ["--objective.kind=sft", "--data.source=sft", "--data.packing=true"],
    "dpo": ["--objective.kind=dpo", "--data.source=preference", "--objective.beta=0.5"],
    "dpo-live": ["--objective.kind=dpo", "--data.source=preference", "--objective.beta=0.5",
                 "--objective.reference=live"],
}
# Not a function of the run: wall-clock rates, and the communication only a layout has.
UNCOMPARED = ("tokens_per_sec",)
UNCOMPARED_PREFIXES = ("comm_",)


# -- chat data with a small tokenizer (shared helpers) ------------------------------------------
def _sentence(rng, low, high):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_chat_data(directory: Path, sft_samples: int = 64, pairs: int = 48) -> dict:
    """{"tokenizer", "sft", "preference", "cache"}: paths of a small byte-level tokenizer's JSON (trained
    on the samples, in milliseconds), of the two jsonl files, and of a data cache directory."""
    from megacpm.data.tokenizer import train_byte_level_bpe

    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    sft = [{"prompt": f"q{i} {_sentence(rng, 2, 4)}?", "response": _sentence(rng, 3, 8)} for i in range(sft_samples)]
    # A preference to learn: the chosen answers end well.
    pref = [{"prompt": f"q{i} {_sentence(rng, 2, 4)}?", "chosen": _sentence(rng, 2, 6) + " good answer",
             "rejected": _sentence(rng, 2, 6) + " bad answer"} for i in range(pairs)]
    paths = {"tokenizer": directory / "tokenizer.json", "sft": directory / "sft.jsonl",
             "preference": directory / "preference.jsonl", "cache": directory / "cache"}
    paths["sft"].write_text("".join(json.dumps(r) + "\n" for r in sft), encoding="utf-8")
    paths["preference"].write_text("".join(json.dumps(r) + "\n" for r in pref), encoding="utf-8")
    text = [" ".join(str(v) for v in r.values()) for r in sft + pref]
    paths["tokenizer"].write_text(train_byte_level_bpe(text * 4, TOKENIZER_VOCAB).to_str(), encoding="utf-8")
    return paths


def overrides(data: dict, kind: str, run_dir: Path, *extra: str) -> list:
    source = "sft" if kind == "sft" else "preference"
    return [*MODEL, *TRAIN, *KINDS[kind], f"--data.path={data[source]}", f"--data.tokenizer={data['tokenizer']}",
            f"--data.cache_dir={data['cache']}", f"--run.dir={run_dir}", *extra]


def read_records(run_dir: Path) -> dict:
    """{step: {metric: value}} of metrics.jsonl (a step's train and eval records merged)."""
    by_step = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step.setdefault(record.pop("step"), {}).update(record)
    return by_step


def comparable(records: dict) -> dict:
    return {step: {k: v for k, v in metrics.items()
                   if k not in UNCOMPARED and not k.startswith(UNCOMPARED_PREFIXES)}
            for step, metrics in records.items()}


def assert_same_metrics(got: dict, expected: dict, rel: float, rewards_abs: float = 0.0, what: str = "") -> None:
    """The same steps and metrics, each value within ``rel``; DPO's rewards (rewards/, eval_rewards/)
    also within ``rewards_abs``."""
    got, expected = comparable(got), comparable(expected)
    assert sorted(got) == sorted(expected), (what, sorted(got), sorted(expected))
    for step, metrics in expected.items():
        assert sorted(got[step]) == sorted(metrics), (what, step, sorted(got[step]), sorted(metrics))
        for key, value in metrics.items():
            tolerance = rewards_abs if "rewards/" in key else 0.0
            assert got[step][key] == pytest.approx(value, rel=rel, abs=tolerance), (what, step, key, got[step][key],
                                                                                   value)


# -- the spawned groups -------------------------------------------------------------------------
def _train_all(jobs):
    """On every rank of a spawned group: train each job (CLI overrides and a layout) with its own
    process groups over the one default group; per job ("ok", (rank 0's messages, the layout)) or
    ("error", the traceback)."""
    from megacpm.config import load_config, validate
    from megacpm.parallel.context import ParallelContext
    from megacpm.train.trainer import Trainer

    results = []
    for job_overrides in jobs:
        messages = []
        try:
            cfg = load_config("tiny", job_overrides)
            p = cfg.parallel
            ctx = ParallelContext.initialize(p.tp, p.pp, p.vpp, timeout_s=300, device_type="cpu", cp=p.cp)
            validate(cfg, world_size=ctx.world_size)
            Trainer(cfg, print_fn=messages.append, ctx=ctx).run()
            layout = ctx.layout
            results.append(("ok", (messages, dict(tp=layout.tp, pp=layout.pp, dp=layout.dp, vpp=layout.vpp))))
        except Exception:  # noqa: BLE001 - reported by the job's test, the next jobs still run
            results.append(("error", traceback.format_exc()))
    return results


LAYOUTS = {  # name: (world size, parallel overrides, the layout (tp, pp, dp, vpp))
    "tp2-sp": (2, ["--parallel.tp=2", "--parallel.sp=true"], (2, 1, 1, 1)),
    "pp2": (2, ["--parallel.pp=2"], (1, 2, 1, 1)),
    "pp2-vpp2": (2, ["--parallel.pp=2", "--parallel.vpp=2"], (1, 2, 1, 2)),
    "dp2-zero1": (2, ["--parallel.zero1=true"], (1, 1, 2, 1)),
    "cp2": (2, ["--parallel.cp=2"], (1, 1, 1, 1)),
    "tp2-pp2-dp2": (8, ["--parallel.tp=2", "--parallel.pp=2"], (2, 2, 2, 1)),
}
PARALLEL_KINDS = ("sft", "dpo")


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("chat-data"))


def _run_group(world, named_jobs, timeout=600):
    """{name: (run directory, status, detail)} after one group of ``world`` processes trained every
    job; status and detail are rank 0's (see _train_all)."""
    names = list(named_jobs)
    results = run_distributed(_train_all, world, args=([named_jobs[n][1] for n in names],), timeout=timeout)
    outcome = {}
    for name, (status, detail) in zip(names, results[0]):
        outcome[name] = (named_jobs[name][0], status, detail)
    return outcome


@pytest.fixture(scope="module")
def runs(tmp_path_factory, chat_data):
    """runs(name) -> (run dir, rank 0's messages, the layout) of a successful run, by name ("one/sft",
    "tp2-sp/dpo", ...). Trained on first use, one spawned group per world size for all its runs."""
    root = tmp_path_factory.mktemp("runs")
    groups = {}

    def jobs_of(world):
        if world == 1:
            names = [f"one/{kind}" for kind in KINDS]
        else:
            names = [f"{layout}/{kind}" for layout, (w, _, _) in LAYOUTS.items() if w == world for kind in PARALLEL_KINDS]
        jobs = {}
        for name in names:
            layout, kind = name.split("/")
            run_dir = root / name.replace("/", "-")
            parallel = [] if layout == "one" else LAYOUTS[layout][1]
            jobs[name] = (run_dir, overrides(chat_data, kind, run_dir, *parallel))
        return jobs

    def get(name):
        layout = name.split("/")[0]
        world = 1 if layout == "one" else LAYOUTS[layout][0]
        if world not in groups:
            groups[world] = _run_group(world, jobs_of(world))
        run_dir, status, detail = groups[world][name]
        assert status == "ok", f"{name}:\n{detail}"
        messages, layout = detail
        return run_dir, messages, layout

    return get


def test_one_process_runs_learn(runs):
    """The reference runs move their fixed evaluation batch by far more than the tolerance (a layout
    that never stepped its optimizer cannot pass), and DPO's rewards leave zero after step 1."""
    for kind in ("sft", "dpo"):
        records = read_records(runs(f"one/{kind}")[0])
        assert sorted(records) == list(range(1, STEPS + 1)), kind
        assert records[2]["eval_loss"] - records[4]["eval_loss"] > 100 * 1e-4 * records[2]["eval_loss"], kind
    dpo = read_records(runs("one/dpo")[0])
    assert dpo[1]["loss"] == pytest.approx(np.log(2), rel=1e-6)  # the policy is the reference at step 1
    assert all(abs(dpo[step]["rewards/margins"]) > 1e-3 for step in (2, 3, 4)), dpo
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "eval_rewards/accuracies", "eval_logps/chosen"} <= set(dpo[4])


def test_dpo_live_reference_equals_precomputed(runs):
    live_dir, live_messages, _ = runs("one/dpo-live")
    _, precompute_messages, _ = runs("one/dpo")
    assert not (live_dir / "reference_logps.npz").exists()
    assert not any("scoring" in m for m in live_messages), live_messages
    assert any("reference (objective.reference precompute): scoring" in m for m in precompute_messages)
    assert_same_metrics(read_records(live_dir), read_records(runs("one/dpo")[0]), rel=1e-6, rewards_abs=1e-6,
                        what="live vs precompute")


CASES = [f"{layout}/{kind}" for layout in LAYOUTS for kind in PARALLEL_KINDS]


@pytest.mark.parametrize("name", CASES)
def test_layout_matches_one_process(runs, name):
    layout, kind = name.split("/")
    run_dir, _, got_layout = runs(name)
    reference_dir = runs(f"one/{kind}")[0]
    assert tuple(got_layout[axis] for axis in ("tp", "pp", "dp", "vpp")) == LAYOUTS[layout][2], got_layout
    # DPO's rewards are differences of log-probabilities (beta * (policy - reference), each some 50
    # nats in float32), so near zero they carry that rounding (~1e-6) rather than a relative error.
    assert_same_metrics(read_records(run_dir), read_records(reference_dir), rel=1e-4, rewards_abs=1e-5, what=name)
    if kind == "dpo":
        with np.load(run_dir / "reference_logps.npz") as got, np.load(reference_dir / "reference_logps.npz") as want:
            assert sorted(got.files) == sorted(want.files)
            for split in ("train", "valid"):
                np.testing.assert_allclose(got[split], want[split], rtol=1e-5, err_msg=f"{name} {split}")
