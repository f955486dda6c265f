"""Chat templates: how a conversation becomes token ids, and which of them are learned.

A template renders a conversation as a list of text segments, each marked trained or not, and the
segments are tokenized one by one (never the joined string): so the boundary between a prompt and
its completion is a token boundary, whatever the tokenizer would merge across it, and the loss mask
is exact. Only assistant turns carry loss: their content, their closing text and (where the
template ends a turn with it) the end-of-document token.

Built in:
- ``none``: no special text. Each message's content as it is; after each assistant turn the
  end-of-document token (tools/preprocess_data.py --append-eod's). A ``prompt``/``response`` line
  is prompt ids + response ids + that token, the loss on the last two.
- ``minicpm`` (MiniCPM-1/2): BOS, then ``<用户>{user.strip()}`` and ``<AI>{assistant.strip()}`` +
  the end token, as MiniCPM's own SFT formats it. A system message is its stripped text, before the
  first user turn.
- ``chatml`` (MiniCPM-128K, MiniCPM-3): ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; the
  assistant's content and its ``<|im_end|>`` are learned, the newline after it is not.

A template file (YAML or JSON) sets any of: ``bos`` (text before the first turn), ``system``,
``user``, ``assistant`` (each ``{prefix: ..., suffix: ...}``), ``assistant_after`` (untrained text
after an assistant's suffix), ``strip`` (strip each content), ``end_of_turn`` (``eod`` or
``none``: the end-of-document token after each assistant turn).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import yaml

from megacpm.data.errors import DataError

ROLES = ("system", "user", "assistant")
Message = Dict[str, str]  # {"role": one of ROLES, "content": text}
Segment = Tuple[str, bool]  # (text, trained)
EOD = object()  # a segment's text standing for the end-of-document token (not text to tokenize)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    bos: str = ""  # text (usually a BOS token's) before the first turn
    system: Tuple[str, str] = ("", "")  # (prefix, suffix) around a system message's content
    user: Tuple[str, str] = ("", "")
    assistant: Tuple[str, str] = ("", "")  # the prefix is context; content and suffix are learned
    assistant_after: str = ""  # untrained text after the assistant's suffix
    strip: bool = False  # strip each message's content
    eod_after_assistant: bool = True  # the end-of-document token closes each assistant turn (learned)

    def segments(self, messages: Sequence[Message]) -> List[Segment]:
        """The conversation as (text or EOD, trained) segments, in order; empty texts omitted."""
        out: List[Segment] = [(self.bos, False)]
        for message in messages:
            role, content = message["role"], message["content"]
            if self.strip:
                content = content.strip()
            prefix, suffix = getattr(self, role)
            trained = role == "assistant"
            out.append((prefix, False))
            out.append((content, trained))
            out.append((suffix, trained))
            if trained:
                out.append((self.assistant_after, False))
                if self.eod_after_assistant:
                    out.append((EOD, True))
        return [(text, trained) for text, trained in out if text is EOD or text]

    def describe(self) -> str:
        """A stable text of the whole definition (it keys the tokenized-data cache)."""
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)


BUILTIN_TEMPLATES: Dict[str, ChatTemplate] = {
    "none": ChatTemplate("none"),
    "minicpm": ChatTemplate("minicpm", bos="<s>", user=("<用户>", ""), assistant=("<AI>", ""), strip=True),
    "chatml": ChatTemplate(
        "chatml",
        system=("<|im_start|>system\n", "<|im_end|>\n"),
        user=("<|im_start|>user\n", "<|im_end|>\n"),
        assistant=("<|im_start|>assistant\n", "<|im_end|>"),
        assistant_after="\n",
        eod_after_assistant=False,
    ),
}

_FILE_KEYS = ("bos", "system", "user", "assistant", "assistant_after", "strip", "end_of_turn")


def _affixes(path: Path, key: str, value) -> Tuple[str, str]:
    if not isinstance(value, dict) or not set(value) <= {"prefix", "suffix"} or not all(
            isinstance(v, str) for v in value.values()):
        raise DataError(f"data.chat_template: {path}: '{key}' must be a mapping with string 'prefix' and/or "
                        f"'suffix', got {value!r}")
    return value.get("prefix", ""), value.get("suffix", "")


def load_template_file(path: Path) -> ChatTemplate:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"data.chat_template: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise DataError(f"data.chat_template: {path}{line}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}"
                        ) from None
    if not isinstance(spec, dict):
        raise DataError(f"data.chat_template: {path}: must be a mapping of {', '.join(_FILE_KEYS)}")
    unknown = sorted(set(spec) - set(_FILE_KEYS))
    if unknown:
        raise DataError(f"data.chat_template: {path}: unknown key(s) {', '.join(map(str, unknown))} "
                        f"(known: {', '.join(_FILE_KEYS)})")
    for key in ("bos", "assistant_after"):
        if not isinstance(spec.get(key, ""), str):
            raise DataError(f"data.chat_template: {path}: '{key}' must be a string")
    if not isinstance(spec.get("strip", False), bool):
        raise DataError(f"data.chat_template: {path}: 'strip' must be true or false")
    end = spec.get("end_of_turn", "eod")
    if end not in ("eod", "none"):
        raise DataError(f"data.chat_template: {path}: 'end_of_turn' must be eod or none, got {end!r}")
    return ChatTemplate(
        name=str(path), bos=spec.get("bos", ""),
        **{role: _affixes(path, role, spec[role]) for role in ROLES if role in spec},
        assistant_after=spec.get("assistant_after", ""), strip=spec.get("strip", False),
        eod_after_assistant=end == "eod")


def resolve_template(name: str) -> ChatTemplate:
    """data.chat_template: a built-in name or a template file."""
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    return load_template_file(Path(name).expanduser())
