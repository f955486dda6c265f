"""tools/eval_long_context.py's parts against plain formulas: position buckets, the passkey prompt.
The end-to-end run (a branch's curriculum evaluated through the script, its bucket losses against
full-logit cross entropies) is in tests/checkpoint/test_reshape.py, which has the runs."""
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from tests.support import imported_tool

TOOL = Path(__file__).resolve().parents[2] / "tools" / "eval_long_context.py"


@pytest.fixture(scope="module")
def tool():
    yield from imported_tool(TOOL, "eval_long_context_tool")


def test_bucket_means_are_the_means_of_equal_position_ranges(tool):
    losses = torch.arange(24, dtype=torch.float32).view(2, 12)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, 0] = False
    losses[0, 0] = 0.0
    means = tool.bucket_means(losses, valid, 3)
    assert means == pytest.approx([(1 + 2 + 3 + 12 + 13 + 14 + 15) / 7, (4 + 5 + 6 + 7 + 16 + 17 + 18 + 19) / 8,
                                   (8 + 9 + 10 + 11 + 20 + 21 + 22 + 23) / 8])


def _word_tokenizer():
    words = "the grass is green . sky blue sun yellow here we go there and back again pass key remember it what ?"
    vocab = {w: i for i, w in enumerate(["[UNK]", *words.split(), *map(str, range(10))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    return tokenizer


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_the_passkey_sits_at_its_depth_and_the_answer_follows_the_question(tool, depth):
    tokenizer = _word_tokenizer()
    prompt, answer = tool.passkey_prompt(tokenizer, 200, depth, "31415")
    assert len(prompt) + len(answer) == 200
    assert answer == tokenizer.encode(" 31415").ids
    question = tokenizer.encode(tool.QUESTION).ids
    assert prompt[-len(question):] == question
    needle = tokenizer.encode(" The pass key is 31415. Remember it. 31415 is the pass key. ").ids
    start = next(i for i in range(len(prompt)) if prompt[i:i + len(needle)] == needle)
    room = 200 - len(needle) - len(question) - len(answer)
    assert start == round(depth * room)


def test_a_length_too_short_for_the_prompt_is_a_usage_error(tool):
    with pytest.raises(tool.UsageError, match="--lengths 10: too short"):
        tool.passkey_prompt(_word_tokenizer(), 10, 0.5, "12345")


def test_data_overrides_change_only_the_data_read(tool):
    from megacpm.config import Config, ConfigError

    cfg = Config()
    other = tool.data_config(cfg, ["--data.path=long.txt", "--data.val_fraction=0.5"])
    assert (other.data.path, other.data.val_fraction) == ("long.txt", 0.5)
    assert (cfg.data.path, cfg.data.val_fraction) != ("long.txt", 0.5)  # the checkpoint's config is left alone
    assert other.model == cfg.model
    assert tool.data_config(cfg, []) is cfg
    with pytest.raises(tool.UsageError, match="--model.vocab_size: only data"):
        tool.data_config(cfg, ["--model.vocab_size=3"])
    with pytest.raises(ConfigError, match="data.no_such_key"):
        tool.data_config(cfg, ["--data.no_such_key=1"])
