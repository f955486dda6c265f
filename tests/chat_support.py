"""Chat data for tests: a small byte-level tokenizer written to a file, and jsonl writers."""
import json
from pathlib import Path

from megacpm.data.tokenizer import EOD_ID, LoadedTokenizer, train_byte_level_bpe

TOKENIZER_VOCAB = 320  # bytes + end token + a few merges: model.vocab_size of the chat tests


def small_tokenizer(directory: Path) -> tuple:
    """(LoadedTokenizer, path of its JSON) trained on a few lines of text (milliseconds)."""
    text = ["def add(x, y):\n    return x + y\n", "The quick brown fox jumps over the lazy dog.",
            "question answer prompt response good bad"] * 20
    tokenizer = train_byte_level_bpe(text, TOKENIZER_VOCAB)
    path = Path(directory) / "tokenizer.json"
    path.write_text(tokenizer.to_str(), encoding="utf-8")
    return LoadedTokenizer(tokenizer, EOD_ID, tokenizer.to_str()), path


def write_jsonl(path: Path, records) -> Path:
    """Records (dicts, or str lines written as they are) one per line."""
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def sft_records(n: int, start: int = 0):
    return [{"prompt": f"def f{i}(x):\n    'add {i}'\n", "response": f"    return x + {i * 3}\n"}
            for i in range(start, start + n)]


def preference_records(n: int):
    return [{"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad {i * 7 % 13} answer"}
            for i in range(n)]
