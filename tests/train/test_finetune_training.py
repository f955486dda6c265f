"""SFT and DPO steps of the Trainer against independent float64 computations: a plain MiniCPM
forward of each sample alone (no packing, no mask, no fused loss), log-softmax and the formulas."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from megacpm.config import load_config
from megacpm.data import IGNORE_INDEX
from megacpm.model import MiniCPM
from megacpm.train.trainer import Trainer
from tests.chat_support import TOKENIZER_VOCAB, preference_records, sft_records, small_tokenizer, write_jsonl

SEED = 5
MODEL = ["--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
         "--model.num_attention_heads=4", "--model.num_key_value_heads=2", f"--model.vocab_size={TOKENIZER_VOCAB}",
         "--model.dim_model_base=8"]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"))[1]


def config(tmp_path, tok_path, source, path, *extra):
    kind = "sft" if source == "sft" else "dpo"
    return load_config("tiny", [*MODEL, f"--data.source={source}", f"--data.path={path}", f"--objective.kind={kind}",
                                f"--data.tokenizer={tok_path}", f"--data.cache_dir={tmp_path / 'cache'}",
                                f"--run.dir={tmp_path / 'run'}", f"--train.seed={SEED}", "--train.seq_len=96",
                                "--train.global_batch_size=4", "--train.micro_batch_size=2",
                                "--train.eval_interval=0", "--train.log_interval=1", "--checkpoint.interval=0",
                                "--log.tensorboard=false", "--optim.lr=0.01", "--schedule.warmup_steps=0", *extra])


def initial_model(cfg) -> MiniCPM:
    model = MiniCPM(cfg.model)
    model.init_weights(torch.Generator().manual_seed(SEED))  # what every rank builds the policy from
    return model.double()


def token_logps(model, inputs, labels):
    """float64 log-probability of each label of one sequence (0 where ignored), the sequence alone."""
    with torch.no_grad():
        logits = model(inputs[None])[0].double()
    picked = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    return torch.where(labels != IGNORE_INDEX, picked, torch.zeros_like(picked))


def test_sft_loss_is_the_masked_cross_entropy_of_each_packed_sample_alone(tmp_path, tok_path):
    records = sft_records(24)
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    cfg = config(tmp_path, tok_path, "sft", path, "--data.packing=true", "--train.steps=1")
    trainer = Trainer(cfg, print_fn=lambda _: None)
    batch = trainer.data.train_batch(0, cfg.train.global_batch_size)
    tokenizer = trainer.data.tokenizer
    responses = {r["response"] for r in records}
    model = initial_model(cfg)
    loss_sum, count = 0.0, 0
    for row in range(batch.num_rows):
        for document in batch.document_ids[row].unique().tolist():
            where = batch.document_ids[row] == document
            labels = batch.labels[row, where]
            if (labels == IGNORE_INDEX).all():
                continue  # the row's padding
            learned = labels[labels != IGNORE_INDEX]
            # Exactly a response and the end token carry loss.
            assert learned[-1] == 0 and tokenizer.decode(learned[:-1].tolist()) in responses
            loss_sum -= float(token_logps(model, batch.input_ids[row, where], labels).sum())
            count += len(learned)
    result = trainer.run()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert result.step == 1 and record["tokens"] == count
    assert record["loss"] == pytest.approx(loss_sum / count, rel=1e-5)


def expected_dpo_metrics(policy, reference, batch, beta):
    """Every DPO metric of a batch from per-token fp64 log-probabilities, each sequence alone."""
    logps = {}
    for name, model in (("policy", policy), ("reference", reference)):
        logps[name] = torch.stack([token_logps(model, batch.input_ids[r], batch.labels[r]).sum()
                                   for r in range(batch.num_rows)])
    chosen_ratio = logps["policy"][0::2] - logps["reference"][0::2]
    rejected_ratio = logps["policy"][1::2] - logps["reference"][1::2]
    rewards_chosen, rewards_rejected = beta * chosen_ratio, beta * rejected_ratio
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return {"loss": losses.mean(), "rewards/chosen": rewards_chosen.mean(),
            "rewards/rejected": rewards_rejected.mean(),
            "rewards/accuracies": (rewards_chosen > rewards_rejected).double().mean(),
            "rewards/margins": (rewards_chosen - rewards_rejected).mean(),
            "logps/chosen": logps["policy"][0::2].mean(), "logps/rejected": logps["policy"][1::2].mean()}


@pytest.mark.parametrize("reference", ["precompute", "live"])
def test_dpo_steps_equal_an_independent_float64_computation(tmp_path, tok_path, reference):
    path = write_jsonl(tmp_path / "pref.jsonl", preference_records(16))
    cfg = config(tmp_path, tok_path, "preference", path, "--train.steps=3", f"--objective.reference={reference}",
                 "--optim.mup_lr_scaling=false")
    trainer = Trainer(cfg, print_fn=lambda _: None)
    initial = initial_model(cfg)
    try:
        trainer._open_run()
        trainer.reference = trainer._prepare_reference()
        assert (tmp_path / "run" / "reference_logps.npz").is_file() == (reference == "precompute")
        first = trainer.train_step(1)
        # Policy = reference: the loss is log 2 and every reward 0.
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert abs(first[name]) < 1e-6
        for step in (2, 3):
            policy = copy.deepcopy(initial)
            policy.load_state_dict({k: v.double() for k, v in trainer.module.model.chunks[0].state_dict().items()})
            batch = trainer.next_batch()
            expected = expected_dpo_metrics(policy, initial, batch, cfg.objective.beta)
            got = trainer.train_step(step)
            for name, value in expected.items():
                assert got[name] == pytest.approx(float(value), rel=1e-4, abs=1e-5), name
        assert got["loss"] < math.log(2)  # it learns
        evaluation = trainer.evaluate()
        assert {"eval_loss", "eval_rewards/accuracies"} <= set(evaluation)
    finally:
        trainer.lock.release()
