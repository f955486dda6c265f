"""tools/make_chat_data.py: SFT and preference jsonl from functions with docstrings.

Most tests run the tool's main() in this process on a small source tree written here (--source-dir),
whose functions' expected prompts and responses are spelled out by hand, each skip reason present
a known number of times; one runs it as a user types it, on the real standard library.
"""
import contextlib
import io
import json
import subprocess
import sys
import textwrap

import pytest

from tests.support import REPO, imported_tool

TOOL = REPO / "tools" / "make_chat_data.py"

MOD_A = '''\
"""Module docstring: not a function's."""
import functools


def add(a, b):
    """Return a + b."""
    total = a + b
    return total


@functools.lru_cache()
def cached(n):
    """Decorated: the prompt starts at the def line."""

    # after a blank line
    return n * 2


class Greeter:
    def greet(self, name,
              punctuation="!"):
        """Greet someone.

        Over several lines.
        """
        message = "Hello, " + name + punctuation
        if name:
            return message
        return None

    def nodoc(self):
        return 1

    def empty(self):
        """Only a docstring."""

    def passes(self):
        """Pass."""
        pass

    def abstract(self):
        """Subclasses implement it."""
        raise NotImplementedError

    def abstract_call(self):
        """Also trivial."""
        raise NotImplementedError("subclass")

    def stub(self):
        """Stub."""
        ...

    async def fetch(self, url):
        """Fetch url."""
        async with self.session(url) as response:
            return await response.text()

    def text(self):
        """A multi-line string written at column 0."""
        return """first
second"""


def oneline(): "Docstring on the def line."; return 1


def outer(x):
    """Outer."""
    def inner(y):
        """Inner."""
        return x + y
    return inner
'''

MOD_B = '''\
def add(a, b):
    """Return a + b."""
    total = a + b
    return total


def same_body(a, b):
    """Another docstring, the body of add."""
    total = a + b
    return total


def long(values):
    """Too long for the default --max-chars."""
    names = [
''' + "".join(f"        'value number {i}',\n" for i in range(30)) + '''    ]
    return names + list(values)
'''

LATIN = b'# -*- coding: latin-1 -*-\ndef cafe():\n    """Caf\xe9."""\n    return "cr\xe8me"\n'

# name: (prompt, response), written from the sources above by hand.
EXPECTED = {
    "add": ('def add(a, b):\n    """Return a + b."""\n', "    total = a + b\n    return total"),
    "cached": ('def cached(n):\n    """Decorated: the prompt starts at the def line."""\n',
               "    # after a blank line\n    return n * 2"),
    "greet": ('def greet(self, name,\n          punctuation="!"):\n    """Greet someone.\n\n    Over several lines.\n'
              '    """\n',
              '    message = "Hello, " + name + punctuation\n    if name:\n        return message\n    return None'),
    "fetch": ('async def fetch(self, url):\n    """Fetch url."""\n',
              "    async with self.session(url) as response:\n        return await response.text()"),
    "text": ('def text(self):\n    """A multi-line string written at column 0."""\n', '    return """first\nsecond"""'),
    "outer": ('def outer(x):\n    """Outer."""\n',
              '    def inner(y):\n        """Inner."""\n        return x + y\n    return inner'),
    "inner": ('def inner(y):\n    """Inner."""\n', "    return x + y"),
    "cafe": ('def cafe():\n    """Café."""\n', '    return "crème"'),
    "same_body": ('def same_body(a, b):\n    """Another docstring, the body of add."""\n',
                  "    total = a + b\n    return total"),
}
# Sorted by path (bad_utf8.py and broken.py do not parse), then line.
ORDER = ["cafe", "add", "cached", "greet", "fetch", "text", "outer", "inner", "same_body"]
SKIPPED = ("1 without a docstring, 1 with an empty body, 4 with a trivial body, 1 too long, "
           "1 with an odd layout, 1 duplicate, 0 over --max-samples; 2 unparsable files")


@pytest.fixture(scope="module")
def tool():
    yield from imported_tool(TOOL, "make_chat_data_tool")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    (root / "mod_a.py").write_text(MOD_A, encoding="utf-8")
    (root / "sub").mkdir()
    (root / "sub" / "mod_b.py").write_text(MOD_B, encoding="utf-8")
    (root / "latin.py").write_bytes(LATIN)
    (root / "broken.py").write_text('def f(:\n    """Never parsed."""\n    return 1\n', encoding="utf-8")
    (root / "bad_utf8.py").write_bytes(b'def g():\n    """Not UTF-8: \xff."""\n    return 1\n')
    (root / "notes.txt").write_text("def ignored():\n    'not a .py file'\n    return 1\n", encoding="utf-8")
    return root


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(tool, capsys, source, out, *extra):
    status = tool.main(["--source-dir", str(source), "--out", str(out), *map(str, extra)])
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


@pytest.fixture(scope="module")
def default_run(tool, source, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "chat"  # not there yet: the tool creates it
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = tool.main(["--source-dir", str(source), "--out", str(out)])
    return status, stdout.getvalue().splitlines(), out


def test_prompts_and_responses_are_the_functions_signatures_docstrings_and_bodies(default_run):
    status, _, out = default_run
    assert status == 0
    rows = read_jsonl(out / "sft.jsonl")
    assert rows == [{"prompt": EXPECTED[name][0], "response": EXPECTED[name][1]} for name in ORDER]
    assert "Café" in (out / "sft.jsonl").read_text(encoding="utf-8")  # ensure_ascii=False
    assert sorted(path.name for path in out.iterdir()) == ["preference.jsonl", "sft.jsonl"]  # no temporaries


def test_prompt_plus_response_is_the_function_again(default_run):
    _, _, out = default_run
    for row in read_jsonl(out / "sft.jsonl"):
        compile(row["prompt"] + row["response"], "<sample>", "exec")
    namespace = {}
    exec(EXPECTED["add"][0] + EXPECTED["add"][1], namespace)
    assert namespace["add"](2, 3) == 5
    exec(EXPECTED["greet"][0] + EXPECTED["greet"][1], namespace)
    assert namespace["greet"](None, "Ada") == "Hello, Ada!"


def test_summary_counts_each_skip_reason(default_run):
    _, lines, out = default_run
    assert lines == [f"{out / 'sft.jsonl'}: 9 samples from 5 files (skipped functions: {SKIPPED})",
                     f"{out / 'preference.jsonl'}: 9 samples (skipped: 0 without another body that fits, 0 over --max-pairs)"]


def test_preference_pairs_a_prompt_with_another_functions_body(default_run):
    _, _, out = default_run
    sft = read_jsonl(out / "sft.jsonl")
    pairs = read_jsonl(out / "preference.jsonl")
    assert [list(pair) for pair in pairs] == [["prompt", "chosen", "rejected"]] * len(sft)
    assert [(pair["prompt"], pair["chosen"]) for pair in pairs] == [(row["prompt"], row["response"]) for row in sft]
    bodies = {row["response"] for row in sft}
    for pair in pairs:
        assert pair["rejected"] != pair["chosen"]
        assert pair["rejected"] in bodies
        assert len(pair["prompt"]) + len(pair["rejected"]) <= 600
    # add and same_body share their body: neither may get it as the rejected one.
    assert all(pair["rejected"] != EXPECTED["add"][1] for pair in pairs[1:2] + pairs[8:9])


def test_same_seed_same_files_other_seed_other_pairing(tool, capsys, source, tmp_path):
    contents = {}
    for name, seed in (("a", 0), ("b", 0), *((f"s{seed}", seed) for seed in range(1, 6))):
        status, _, _ = run(tool, capsys, source, tmp_path / name, "--seed", seed)
        assert status == 0
        contents[name] = ((tmp_path / name / "sft.jsonl").read_bytes(),
                          (tmp_path / name / "preference.jsonl").read_bytes())
    assert contents["a"] == contents["b"]
    assert len({sft for sft, _ in contents.values()}) == 1  # the seed only moves the pairing
    assert len({preference for _, preference in contents.values()}) > 1


def test_max_chars_skips_longer_functions(tool, capsys, source, tmp_path):
    status, lines, _ = run(tool, capsys, source, tmp_path / "wide", "--max-chars", 10_000)
    assert status == 0 and "0 too long" in lines[0]
    long_prompt = 'def long(values):\n    """Too long for the default --max-chars."""\n'
    assert long_prompt in [row["prompt"] for row in read_jsonl(tmp_path / "wide" / "sft.jsonl")]

    limit = len(EXPECTED["add"][0]) + len(EXPECTED["add"][1])  # add fits exactly, greet does not
    status, lines, _ = run(tool, capsys, source, tmp_path / "narrow", "--max-chars", limit)
    assert status == 0
    rows = read_jsonl(tmp_path / "narrow" / "sft.jsonl")
    assert {"prompt": EXPECTED["add"][0], "response": EXPECTED["add"][1]} in rows
    assert all(len(row["prompt"]) + len(row["response"]) <= limit for row in rows)
    fitting = [name for name in ORDER if len(EXPECTED[name][0]) + len(EXPECTED[name][1]) <= limit]
    assert rows == [{"prompt": EXPECTED[name][0], "response": EXPECTED[name][1]} for name in fitting]
    assert f"{1 + len(ORDER) - len(fitting)} too long" in lines[0]
    for pair in read_jsonl(tmp_path / "narrow" / "preference.jsonl"):
        assert len(pair["prompt"]) + len(pair["rejected"]) <= limit


def test_max_samples_keeps_a_seeded_subset_in_order(tool, capsys, source, tmp_path):
    status, lines, _ = run(tool, capsys, source, tmp_path / "few", "--max-samples", 3)
    assert status == 0 and "6 over --max-samples" in lines[0]
    rows = read_jsonl(tmp_path / "few" / "sft.jsonl")
    expected = [{"prompt": EXPECTED[name][0], "response": EXPECTED[name][1]} for name in ORDER]
    assert len(rows) == 3 and sorted(rows, key=expected.index) == rows and all(row in expected for row in rows)
    bodies = {row["response"] for row in rows}
    for pair in read_jsonl(tmp_path / "few" / "preference.jsonl"):
        assert pair["rejected"] in bodies and pair["rejected"] != pair["chosen"]


def test_max_pairs_keeps_a_seeded_subset_of_the_pairs_in_order(tool, capsys, source, tmp_path):
    status, lines, _ = run(tool, capsys, source, tmp_path / "all", "--max-pairs", 0)
    every = read_jsonl(tmp_path / "all" / "preference.jsonl")
    status, lines, _ = run(tool, capsys, source, tmp_path / "few", "--max-pairs", 4)
    assert status == 0 and lines[1].endswith(f"4 samples (skipped: 0 without another body that fits, "
                                             f"{len(every) - 4} over --max-pairs)")
    kept = read_jsonl(tmp_path / "few" / "preference.jsonl")
    assert len(kept) == 4 and sorted(kept, key=every.index) == kept and all(pair in every for pair in kept)
    assert len(read_jsonl(tmp_path / "few" / "sft.jsonl")) == len(every)  # SFT keeps every sample


def test_a_sample_without_another_body_gets_no_pair(tool, capsys, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "one.py").write_text(textwrap.dedent('''\
        def first():
            """One."""
            return 1


        def second():
            """Two, the same body."""
            return 1
        '''), encoding="utf-8")
    status, lines, _ = run(tool, capsys, tmp_path / "src", tmp_path / "out")
    assert status == 0
    assert len(read_jsonl(tmp_path / "out" / "sft.jsonl")) == 2
    assert (tmp_path / "out" / "preference.jsonl").read_text(encoding="utf-8") == ""
    assert lines[1].endswith(": 0 samples (skipped: 2 without another body that fits, 0 over --max-pairs)")


BAD_ARGUMENTS = {  # name: (arguments, expected in the error line)
    "max chars zero": (["--max-chars", "0"], "--max-chars: must be > 0, got 0"),
    "max chars negative": (["--max-chars", "-5"], "--max-chars: must be > 0, got -5"),
    "max chars not a number": (["--max-chars", "many"], "argument --max-chars: invalid int value: 'many'"),
    "max corpus zero": (["--max-corpus-mb", "0"], "--max-corpus-mb: must be a positive number, got 0.0"),
    "max corpus nan": (["--max-corpus-mb", "nan"], "--max-corpus-mb: must be a positive number, got nan"),
    "max samples zero": (["--max-samples", "0"], "--max-samples: must be >= 1, got 0"),
    "missing source": (["--source-dir", "{root}/missing"], "missing does not exist"),
    "source a file": (["--source-dir", "{root}/file.py"], "file.py is not a directory"),
    "out under a file": (["--out", "{root}/file.py/out"], "--out: {root}/file.py is a file, not a directory"),
}


@pytest.mark.parametrize("name", BAD_ARGUMENTS)
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(tool, capsys, tmp_path, name):
    arguments, expected = BAD_ARGUMENTS[name]
    (tmp_path / "file.py").write_text("x = 1\n", encoding="utf-8")
    out = ["--out", str(tmp_path / "out")] if "--out" not in arguments else []
    argv = [arg.format(root=tmp_path) for arg in arguments] + out
    try:
        status = tool.main(argv)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("make_chat_data: error: ")
    assert expected.format(root=tmp_path) in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file.py"]


def test_no_sample_at_all_exits_1(tool, capsys, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "plain.py").write_text("def f():\n    return 1\n", encoding="utf-8")
    status, _, err = run(tool, capsys, tmp_path / "src", tmp_path / "out")
    assert status == 1
    assert err.count("\n") == 1 and "make_chat_data: error: no function with a docstring" in err
    assert not (tmp_path / "out").exists()


def test_real_standard_library(tmp_path):
    """As a user runs it, on 1.5 MB of the standard library (1 MB is mostly pydoc_data/topics.py,
    the documentation's text, which has no function)."""
    out = tmp_path / "chat"
    result = subprocess.run([sys.executable, str(TOOL), "--out", str(out), "--max-corpus-mb", "1.5"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{out / 'sft.jsonl'}: ")
    sft = read_jsonl(out / "sft.jsonl")
    pairs = read_jsonl(out / "preference.jsonl")
    assert len(sft) >= 200 and len(pairs) == len(sft)
    assert f": {len(sft)} samples from " in lines[0] and f": {len(pairs)} samples " in lines[1]
    for row in sft:
        assert list(row) == ["prompt", "response"] and all(isinstance(v, str) and v for v in row.values())
        assert len(row["prompt"]) + len(row["response"]) <= 600
        assert row["prompt"].startswith(("def ", "async def ")) and row["prompt"].endswith("\n")
        try:
            compile(row["prompt"] + row["response"], "<sample>", "exec")
        except SyntaxError as err:  # a nested function's nonlocal has no binding at the top level
            assert "nonlocal" in err.msg
    for pair in pairs:
        assert list(pair) == ["prompt", "chosen", "rejected"] and all(isinstance(v, str) for v in pair.values())
        assert pair["rejected"] != pair["chosen"]
