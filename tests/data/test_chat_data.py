"""Chat data (megacpm.data.chat): templates and loss masks against ids built by hand from the
tokenizer, packing against the samples alone, problem reports, the cache, splits and streams."""
import json

import numpy as np
import pytest
import torch

from megacpm.config import load_config
from megacpm.data import IGNORE_INDEX, Batch, DataError, build_datasets
from megacpm.data.chat import encode, pack_next_fit
from megacpm.data.chat_template import BUILTIN_TEMPLATES, resolve_template
from tests.chat_support import TOKENIZER_VOCAB, preference_records, sft_records, small_tokenizer, write_jsonl

EOD = 0


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


def ids(loaded, text):
    return loaded.tokenizer.encode(text, add_special_tokens=False).ids


def chat_config(tmp_path, tok_path, source, path, *extra):
    kind = "sft" if source == "sft" else "dpo"
    return load_config("tiny", [f"--data.source={source}", f"--data.path={path}", f"--objective.kind={kind}",
                                f"--data.tokenizer={tok_path}", f"--data.cache_dir={tmp_path / 'cache'}",
                                f"--model.vocab_size={TOKENIZER_VOCAB}", *extra])


def build(cfg, seq_len=48, seed=0, warnings=None):
    sink = warnings if warnings is not None else []
    return build_datasets(cfg.data, cfg.model.vocab_size, seq_len, seed, warn=sink.append)


def labelled(row_inputs, row_labels):
    """The learned tokens of a row, in order."""
    return row_labels[row_labels != IGNORE_INDEX].tolist()


# -- templates -------------------------------------------------------------------------------
def test_none_template_is_prompt_ids_response_ids_and_the_end_token(tok):
    loaded, _ = tok
    conversation = [{"role": "user", "content": "question 1?"}, {"role": "assistant", "content": " answer"}]
    token_ids, learned = encode(loaded.tokenizer, EOD, BUILTIN_TEMPLATES["none"], conversation)
    prompt, response = ids(loaded, "question 1?"), ids(loaded, " answer")
    assert token_ids.tolist() == prompt + response + [EOD]
    assert learned.tolist() == [False] * len(prompt) + [True] * (len(response) + 1)


def test_minicpm_template_strips_and_learns_the_answer_and_its_end(tok):
    loaded, _ = tok
    conversation = [{"role": "system", "content": " be brief "}, {"role": "user", "content": " hi "},
                    {"role": "assistant", "content": " yes "}, {"role": "user", "content": "and?"},
                    {"role": "assistant", "content": "no"}]
    token_ids, learned = encode(loaded.tokenizer, EOD, BUILTIN_TEMPLATES["minicpm"], conversation)
    # The small tokenizer has no <s>: the BOS is left out rather than spelled as text.
    context = ids(loaded, "be brief") + ids(loaded, "<用户>") + ids(loaded, "hi") + ids(loaded, "<AI>")
    first = ids(loaded, "yes") + [EOD]
    second_context = ids(loaded, "<用户>") + ids(loaded, "and?") + ids(loaded, "<AI>")
    second = ids(loaded, "no") + [EOD]
    assert token_ids.tolist() == context + first + second_context + second
    assert learned.tolist() == ([False] * len(context) + [True] * len(first) + [False] * len(second_context)
                                + [True] * len(second))


def test_chatml_learns_content_and_im_end_but_not_the_newline_after(tok):
    loaded, _ = tok
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    token_ids, learned = encode(loaded.tokenizer, EOD, BUILTIN_TEMPLATES["chatml"], conversation)
    context = ids(loaded, "<|im_start|>user\n") + ids(loaded, "q") + ids(loaded, "<|im_end|>\n") + ids(
        loaded, "<|im_start|>assistant\n")
    answer = ids(loaded, "a") + ids(loaded, "<|im_end|>")
    after = ids(loaded, "\n")
    assert token_ids.tolist() == context + answer + after
    assert learned.tolist() == [False] * len(context) + [True] * len(answer) + [False] * len(after)


def test_template_file(tmp_path, tok):
    loaded, _ = tok
    path = tmp_path / "t.yaml"
    path.write_text("user: {prefix: 'U: ', suffix: \"\\n\"}\nassistant: {prefix: 'A: '}\nend_of_turn: none\n")
    template = resolve_template(str(path))
    token_ids, learned = encode(loaded.tokenizer, EOD, template,
                                [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    context = ids(loaded, "U: ") + ids(loaded, "q") + ids(loaded, "\n") + ids(loaded, "A: ")
    assert token_ids.tolist() == context + ids(loaded, "a")
    assert learned.tolist() == [False] * len(context) + [True] * len(ids(loaded, "a"))
    path.write_text("user: {prefix: 'U'}\nturns: 3\n")
    with pytest.raises(DataError, match=r"t.yaml: unknown key\(s\) turns"):
        resolve_template(str(path))


# -- rows, labels, packing --------------------------------------------------------------------
def test_unpacked_rows_align_labels_with_the_next_token_and_pad_without_loss(tmp_path, tok):
    loaded, tok_path = tok
    records = sft_records(6)
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    bundle = build(chat_config(tmp_path, tok_path, "sft", path))
    batch = bundle.train.batch_of(range(bundle.train.num_samples))
    assert batch.position_ids is None and batch.document_ids is None
    seen = set()
    for row in range(batch.num_rows):
        sample = bundle.train.units[int(batch.extras["sample_index"][row])][0]
        record = records[sample]
        full = ids(loaded, record["prompt"]) + ids(loaded, record["response"]) + [EOD]
        n = len(full) - 1
        assert batch.input_ids[row, :n].tolist() == full[:-1]
        expected_labels = [IGNORE_INDEX] * (len(ids(loaded, record["prompt"])) - 1) + full[len(
            ids(loaded, record["prompt"])):]
        assert batch.labels[row, :n].tolist() == expected_labels
        assert (batch.labels[row, n:] == IGNORE_INDEX).all() and (batch.input_ids[row, n:] == EOD).all()
        seen.add(sample)
    assert len(seen) == bundle.train.num_samples


def test_packed_rows_hold_each_sample_as_it_is_alone(tmp_path, tok):
    _, tok_path = tok
    path = write_jsonl(tmp_path / "sft.jsonl", sft_records(30))
    alone = build(chat_config(tmp_path, tok_path, "sft", path), seq_len=128)
    packed = build(chat_config(tmp_path, tok_path, "sft", path, "--data.packing=true"), seq_len=128)
    assert packed.train.num_samples < alone.train.num_samples  # several samples per row
    by_sample = {}
    single = alone.train.batch_of(range(alone.train.num_samples))
    for row in range(single.num_rows):
        sample = alone.train.units[int(single.extras["sample_index"][row])][0]
        n = int((single.labels[row] != IGNORE_INDEX).nonzero().max()) + 1
        by_sample[sample] = (single.input_ids[row, :n], single.labels[row, :n])
    batch = packed.train.batch_of(range(packed.train.num_samples))
    placed = []
    for row in range(batch.num_rows):
        samples = packed.train.units[int(batch.extras["sample_index"][row])]
        documents = batch.document_ids[row]
        for document, sample in enumerate(samples):
            where = (documents == document).nonzero()[:, 0]
            assert (where == torch.arange(where[0], where[0] + len(where))).all()  # contiguous
            assert batch.position_ids[row, where].tolist() == list(range(len(where)))  # restarting
            x, y = by_sample[int(sample)]
            assert batch.input_ids[row, where].tolist() == x.tolist()
            assert batch.labels[row, where].tolist() == y.tolist()
            placed.append(int(sample))
        tail = documents == len(samples)  # the padding is a document of its own, without loss
        assert (batch.labels[row, tail] == IGNORE_INDEX).all()
    assert sorted(placed) == sorted(by_sample)  # every train sample exactly once


def test_next_fit_packing_against_a_plain_loop():
    lengths = np.asarray([5, 3, 7, 2, 2, 9, 1, 4])
    order = np.asarray([3, 0, 7, 1, 5, 2, 6, 4])
    rows, row, used = [], [], 0
    for s in order:
        if row and used + lengths[s] > 10:
            rows.append(row)
            row, used = [], 0
        row.append(int(s))
        used += lengths[s]
    rows.append(row)
    assert pack_next_fit(lengths, order, 10) == rows


def test_preference_rows_are_adjacent_chosen_then_rejected(tmp_path, tok):
    loaded, tok_path = tok
    records = preference_records(8)
    path = write_jsonl(tmp_path / "pref.jsonl", records)
    bundle = build(chat_config(tmp_path, tok_path, "preference", path))
    batch = bundle.train.batch(0, 3)
    assert batch.num_rows == 6 and bundle.train.rows_per_sample == 2
    for pair in range(3):
        unit = int(batch.extras["sample_index"][2 * pair])
        assert int(batch.extras["sample_index"][2 * pair + 1]) == unit
        record = records[int(bundle.train.units[unit][0])]
        for side, key in ((0, "chosen"), (1, "rejected")):
            row = 2 * pair + side
            assert labelled(batch.input_ids[row], batch.labels[row]) == ids(loaded, record[key]) + [EOD]
            prompt = ids(loaded, record["prompt"])
            assert batch.input_ids[row, :len(prompt)].tolist() == prompt


# -- problems -------------------------------------------------------------------------------
def test_each_problem_is_counted_with_its_line_numbers(tmp_path, tok):
    _, tok_path = tok
    lines = [*sft_records(4), "{not json", {"messages": [{"role": "robot", "content": "x"}]},
             {"prompt": "p", "response": "  "}, {"prompt": "p " * 200, "response": "r"}, [1, 2],
             {"messages": [{"role": "user", "content": "only a question"}]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    warnings = []
    bundle = build(chat_config(tmp_path, tok_path, "sft", path), warnings=warnings)
    assert bundle.train.num_docs + bundle.valid.num_docs == 4
    assert len(warnings) == 1
    line = warnings[0]
    assert str(path) in line and "\n" not in line
    for expected in ("1 malformed JSON (line 5)", "1 unknown role (line 6)", "2 empty completion (lines 7, 10)",
                     "1 too long (line 8)", "1 not a chat sample (line 9)"):
        assert expected in line
    # From the cache, the same report.
    again = []
    build(chat_config(tmp_path, tok_path, "sft", path), warnings=again)
    assert again == warnings


def test_too_long_truncate_cuts_to_seq_len(tmp_path, tok):
    loaded, tok_path = tok
    records = [*sft_records(3), {"prompt": "question", "response": " answer" * 80}]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    warnings = []
    bundle = build(chat_config(tmp_path, tok_path, "sft", path, "--data.too_long=truncate", "--data.val_fraction=0.25"),
                   seq_len=32, warnings=warnings)
    assert "1 truncated (line 4)" in warnings[0]
    everything = [bundle.train.batch_of(range(bundle.train.num_samples)),
                  bundle.valid.batch_of(range(bundle.valid.num_samples))]
    full = ids(loaded, "question") + ids(loaded, " answer" * 80) + [EOD]
    found = [b.input_ids[r].tolist() for b in everything for r in range(b.num_rows)
             if b.input_ids[r].tolist() == full[:32]]
    assert found  # the long sample: its first 33 tokens, as 32 inputs


def test_a_file_without_usable_lines_is_one_error(tmp_path, tok):
    _, tok_path = tok
    path = write_jsonl(tmp_path / "bad.jsonl", ["{", {"prompt": "x"}])
    with pytest.raises(DataError) as info:
        build(chat_config(tmp_path, tok_path, "sft", path))
    message = str(info.value)
    assert "bad.jsonl: no usable sft sample in 2 lines" in message and "line 1" in message and "\n" not in message


def test_path_may_be_a_directory_or_a_list(tmp_path, tok):
    _, tok_path = tok
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", sft_records(3))
    write_jsonl(tmp_path / "d" / "b.jsonl", sft_records(3, start=3))
    from_dir = build(chat_config(tmp_path, tok_path, "sft", tmp_path / "d"))
    listed = build(chat_config(tmp_path, tok_path, "sft",
                               f"[{tmp_path / 'd' / 'a.jsonl'}, {tmp_path / 'd' / 'b.jsonl'}]"))
    for bundle in (from_dir, listed):
        assert bundle.train.num_docs + bundle.valid.num_docs == 6
    assert torch.equal(from_dir.train.batch(0, 4).input_ids, listed.train.batch(0, 4).input_ids)
    with pytest.raises(DataError, match="does not exist"):
        build(chat_config(tmp_path, tok_path, "sft", tmp_path / "missing.jsonl"))


# -- cache, splits, streams -------------------------------------------------------------------
def test_cache_is_reused_and_keyed_by_the_file_content(tmp_path, tok, monkeypatch):
    _, tok_path = tok
    path = write_jsonl(tmp_path / "sft.jsonl", sft_records(6))
    first = build(chat_config(tmp_path, tok_path, "sft", path))
    import megacpm.data.chat as chat

    real = chat.tokenize_files
    monkeypatch.setattr(chat, "tokenize_files", lambda *a, **k: pytest.fail("tokenized again"))
    cached = build(chat_config(tmp_path, tok_path, "sft", path))
    assert torch.equal(first.train.batch(0, 5).labels, cached.train.batch(0, 5).labels)
    monkeypatch.setattr(chat, "tokenize_files", real)
    write_jsonl(path, sft_records(6, start=10))
    changed = build(chat_config(tmp_path, tok_path, "sft", path))
    assert changed.signature != first.signature


def test_validation_split_does_not_depend_on_the_seed_and_streams_resume_exactly(tmp_path, tok):
    _, tok_path = tok
    path = write_jsonl(tmp_path / "sft.jsonl", sft_records(40))
    cfg = chat_config(tmp_path, tok_path, "sft", path, "--data.val_fraction=0.1")
    a, b = build(cfg, seed=0), build(cfg, seed=1)
    assert a.valid.sample_ids.tolist() == b.valid.sample_ids.tolist() and len(a.valid.sample_ids) == 4
    assert not set(a.valid.sample_ids) & set(a.train.sample_ids)
    whole = a.train_batch(0, 80)  # more than two epochs of 36
    part = a.train_batch(30, 20)
    assert torch.equal(whole.input_ids[30:50], part.input_ids)
    first_epoch = whole.extras["sample_index"][:36].tolist()
    assert sorted(first_epoch) == list(range(36))  # each unit once per epoch
    assert whole.extras["sample_index"][36:72].tolist() != first_epoch  # a new order each epoch
    assert a.train_batch(0, 10).extras["sample_index"].tolist() != b.train_batch(0, 10).extras[
        "sample_index"].tolist()


def test_eval_batch_is_every_held_out_unit_once(tmp_path, tok):
    _, tok_path = tok
    path = write_jsonl(tmp_path / "pref.jsonl", preference_records(20))
    bundle = build(chat_config(tmp_path, tok_path, "preference", path, "--data.val_fraction=0.1"))
    batch = bundle.eval_batch(16)
    assert batch.num_rows == 2 * bundle.valid.num_samples == 4
    assert batch.extras["sample_index"].tolist() == [0, 0, 1, 1]


# -- the pretraining document mask -----------------------------------------------------------
def test_document_mask_from_end_tokens_against_a_loop():
    inputs = torch.tensor([[5, 6, 0, 7, 8, 0, 0, 9], [0, 1, 2, 3, 4, 5, 6, 7]])
    batch = Batch(inputs, inputs.clone()).with_document_mask(0)
    for row in range(2):
        document, position = 0, 0
        for t in range(8):
            assert batch.document_ids[row, t] == document and batch.position_ids[row, t] == position
            position += 1
            if inputs[row, t] == 0:
                document, position = document + 1, 0


def test_document_mask_reaches_pretraining_batches(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n\n".join(f"document {i}: " + "words " * (i % 7 + 3) for i in range(100)))
    cfg = load_config("tiny", [f"--data.cache_dir={tmp_path}", "--data.document_mask=true", "--data.source=text",
                               f"--data.path={corpus}", f"--model.vocab_size={TOKENIZER_VOCAB}", "--data.val_fraction=0.2"])
    bundle = build_datasets(cfg.data, cfg.model.vocab_size, 64, 0)
    batch = bundle.train_batch(0, 4)
    assert batch.document_ids is not None
    expected = Batch(batch.input_ids, batch.labels).with_document_mask(bundle.eod_id)
    assert torch.equal(batch.position_ids, expected.position_ids)
    assert int(batch.document_ids.max()) >= 1  # short documents end inside a row


def test_cached_report_is_json(tmp_path, tok):
    _, tok_path = tok
    path = write_jsonl(tmp_path / "sft.jsonl", [*sft_records(3), "{"])
    build(chat_config(tmp_path, tok_path, "sft", path))
    reports = list((tmp_path / "cache" / "chat").glob("*.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())["report"]
    assert report == {str(path): {"malformed JSON": [4]}}
