"""Reading configs: presets, YAML files, run directories and dotted overrides, with strict typing.

Every problem is a :class:`ConfigError` whose message is one line starting with the offending key
(a YAML file's problems name the file and line), so the CLI can print it and exit before anything is
created. The rules hold for every field of the schema at once:

- numbers are finite: NaN and infinities are refused wherever a number stands, nested ones too;
- an int field takes an integer (``1e6`` too) of magnitude below 2**63, never ``true`` or ``1.5``;
- a str field keeps the text the user typed in an override (``--run.name=2024`` is "2024", ``no``
  is "no"); in a YAML file a value YAML reads as another type (``name: no`` is false) is refused
  with a hint to quote it;
- a YAML file is UTF-8, one document whose top level is a mapping of sections, each a mapping,
  without a key given twice at any depth.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, NoReturn, Optional, Tuple

import yaml

from megacpm.config.schema import SECTIONS, Config
from megacpm.io.errors import describe_decode_error, os_error_cause
from megacpm.io.run_dir import CONFIG_FILE

PRESET_DIR = Path(__file__).resolve().parent / "presets"
INT_LIMIT = 2**63  # an int field holds a signed 64-bit integer (torch, numpy and C take it)
MAX_CONFIG_BYTES = 16 * 2**20  # a config file is a few kB; a bigger one is not a config
MAX_NESTED_ITEMS = 10_000  # values inside one free-form field (model.rope_scaling)
_YAML_NULLS = ("null", "Null", "NULL", "~")


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key and the problem. ``key`` is the dotted
    key when one is known (the loader adds the YAML file and line of that key)."""

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key


class _TypeMismatch(ConfigError):
    """The value is not of the field's type at all (a Union tries its next member)."""


def shown(text: Any) -> str:
    """``text`` as it can stand in a one-line message: itself when printable, else its repr."""
    text = str(text)
    return text if text.isprintable() else repr(text)


def _value_repr(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def preset_names() -> List[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(choice) for choice in typing.get_args(tp))
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (dict, Dict):
        return "mapping"
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _fail(key: str, problem: str) -> NoReturn:
    raise ConfigError(f"{shown(key)}: {problem}", key=key)


def _mismatch(key: str, expected: str, value: Any) -> NoReturn:
    raise _TypeMismatch(f"{shown(key)}: expected {expected}, got {_value_repr(value)}", key=key)


def check_choice(key: str, value: Any, tp: Any) -> Any:
    """``value`` when it is one of the choices of the Literal type ``tp``, else one ConfigError."""
    choices = typing.get_args(tp)
    # Equality alone would let True stand for 1 (or 1.0 for 1); the type must match too.
    if any(value == choice and type(value) is type(choice) for choice in choices):
        return value
    _fail(key, f"must be one of {', '.join(str(c) for c in choices)}, got {_value_repr(value)}")


def check_finite(key: str, value: Any) -> None:
    """One ConfigError naming the (nested) key of the first NaN or infinity inside ``value``."""
    seen = 0
    stack = [(key, value)]
    while stack:
        where, item = stack.pop()
        seen += 1
        if seen > MAX_NESTED_ITEMS:
            _fail(key, f"more than {MAX_NESTED_ITEMS} nested values")
        if isinstance(item, float) and not math.isfinite(item):
            _fail(where, f"must be a finite number, got {item}")
        if isinstance(item, dict):
            stack.extend((f"{where}[{k!r}]", v) for k, v in reversed(list(item.items())))
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(item))))


def _is_str_field(tp: Any) -> bool:
    """str, Optional[str] or a string-or-list-of-strings field (data.path): the fields whose
    override text is taken as typed (a list-taking field's text in [...] is a YAML list)."""
    if tp is str:
        return True
    if typing.get_origin(tp) is not typing.Union:
        return False
    members = set(typing.get_args(tp)) - {type(None)}
    return str in members and all(m is str or typing.get_origin(m) is list for m in members)


def _takes_list(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Union and any(typing.get_origin(m) is list for m in typing.get_args(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return check_choice(key, value, tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except _TypeMismatch as exc:
                if exc.key != key:  # a nested item's own problem (data.mixture['a']: ...) is the message
                    raise
        _mismatch(key, _type_name(tp), value)
    if origin in (list, List):
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            _mismatch(key, "a list", value)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (dict, Dict) or tp is dict:
        if not isinstance(value, dict):
            _mismatch(key, "a mapping", value)
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        out = {}
        for k, v in value.items():
            if key_tp is str and not isinstance(k, str):
                _fail(key, f"keys must be strings, got {_value_repr(k)} (quote it in YAML)")
            out[k] = _coerce(f"{key}[{k!r}]", v, value_tp)
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        _mismatch(key, "true or false", value)
    if tp is int:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)  # 1e6 written for an integer field
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT_LIMIT < value < INT_LIMIT:
                _fail(key, f"must be an integer of magnitude below 2**63, got {_value_repr(value)}")
            return value
        _mismatch(key, "an integer", value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond any float
                number = math.inf
            if not math.isfinite(number):
                _fail(key, f"must be a finite number, got {_value_repr(value)}")
            return number
        _mismatch(key, "a number", value)
    if tp is str:
        if isinstance(value, str):
            return value
        _mismatch(key, "a string", value)
    if tp is Any:
        check_finite(key, value)
        return value
    _fail(key, f"unsupported field type {tp!r}")


def _section_fields(section_obj: Any) -> Dict[str, Any]:
    hints = typing.get_type_hints(type(section_obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(section_obj)}


def _field_type(cfg: Config, dotted: str) -> Any:
    """The annotation of the field ``section.key``; ConfigError for an unknown one."""
    parts = dotted.split(".")
    if len(parts) != 2:
        _fail(dotted, "config keys have the form section.key")
    section, key = parts
    if section not in SECTIONS:
        _fail(dotted, f"unknown section {shown(repr(section))} (known: {', '.join(SECTIONS)})")
    fields = _section_fields(getattr(cfg, section))
    if key not in fields:
        _fail(dotted, f"unknown key (known in '{section}': {', '.join(fields)})")
    return fields[key]


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    tp = _field_type(cfg, dotted)
    section, key = dotted.split(".")
    setattr(getattr(cfg, section), key, _coerce(dotted, value, tp))


# -- YAML files ----------------------------------------------------------------------------------

_MERGE_TAG = "tag:yaml.org,2002:merge"
# YAML 1.1 reads 1e-3 (no dot) as a string; configs mean a number, as YAML 1.2 and the overrides do.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_EXPONENT_FIRST = list("-+0123456789.")


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that, before constructing, refuses a key given twice in one mapping (PyYAML keeps
    the last one silently) and records the line of every key, for messages naming them."""

    def check_and_record(self, root: yaml.Node, path: str) -> Dict[str, int]:
        """{dotted key: 1-based line} of ``root``'s keys (``section``, ``section.key``, then
        ``section.key['inner']`` / ``[i]``); a duplicate key raises ConfigError with both lines."""
        lines: Dict[str, int] = {}
        stack: List[Tuple[str, yaml.Node, int]] = [("", root, 0)]
        while stack:
            where, node, depth = stack.pop()
            if isinstance(node, yaml.MappingNode):
                first: Dict[Any, int] = {}
                for key_node, value_node in node.value:
                    if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                        continue
                    key = self.construct_object(key_node)
                    line = key_node.start_mark.line + 1
                    inner = str(key) if depth == 0 else f"{where}.{key}" if depth == 1 else f"{where}[{key!r}]"
                    try:
                        earlier = first.get(key)
                    except TypeError:  # an unhashable key: construction reports it
                        continue
                    if earlier is not None:
                        what = "section" if depth == 0 else "key"
                        raise ConfigError(f"{shown(inner)}: duplicate {what} in {shown(path)} (lines {earlier} "
                                          f"and {line}; give it once)", key=inner)
                    first[key] = line
                    lines.setdefault(inner, line)
                    stack.append((inner, value_node, depth + 1))
            elif isinstance(node, yaml.SequenceNode) and depth >= 2:
                for i, item in enumerate(node.value):
                    inner = f"{where}[{i}]"
                    lines.setdefault(inner, item.start_mark.line + 1)
                    stack.append((inner, item, depth + 1))
        return lines

    @staticmethod
    def plain_text(root: yaml.Node) -> Dict[str, str]:
        """{section.key: text} of the sections' values written as plain (unquoted) scalars."""
        out: Dict[str, str] = {}
        if not isinstance(root, yaml.MappingNode):
            return out
        for section_node, body in root.value:
            if not isinstance(section_node, yaml.ScalarNode) or not isinstance(body, yaml.MappingNode):
                continue
            for key_node, value_node in body.value:
                if isinstance(key_node, yaml.ScalarNode) and isinstance(value_node, yaml.ScalarNode) \
                        and value_node.style is None:
                    out[f"{section_node.value}.{key_node.value}"] = value_node.value
        return out


class _ConfigDumper(yaml.SafeDumper):
    """SafeDumper that quotes what _ConfigLoader reads as a number (a run.name "1e3" stays a string)."""


for _cls in (_ConfigLoader, _ConfigDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, _EXPONENT_FIRST)


def _yaml_error(path: str, exc: yaml.YAMLError, text: str) -> ConfigError:
    """``FILE:LINE:COLUMN: invalid YAML: <yaml's problem> (<its context>)``."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return ConfigError(f"{path}:{line}: invalid YAML: unacceptable character #x{exc.character:04x} "
                           f"({exc.reason})")
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    context = getattr(exc, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return ConfigError(f"{where}: invalid YAML: {shown(detail)}")


class YamlDocument(typing.NamedTuple):
    data: Any
    lines: Dict[str, int]  # dotted key -> its line
    plain: Dict[str, str]  # section.key -> the text of its value, when written unquoted


def read_yaml(path: Path) -> YamlDocument:
    """A config file's content (one UTF-8 YAML document, no duplicate keys), with its keys' lines."""
    name = shown(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{name}: {size} bytes is too large for a config file")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read config ({os_error_cause(exc)})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(shown(describe_decode_error(path, exc))) from None
    loader = None
    try:
        loader = _ConfigLoader(text)  # its reader refuses control characters right away
        root = loader.get_single_node()
        if root is None:
            return YamlDocument({}, {}, {})
        lines = loader.check_and_record(root, str(path))
        plain = loader.plain_text(root)
        data = loader.construct_document(root)
    except ConfigError:
        raise
    except yaml.YAMLError as exc:
        raise _yaml_error(name, exc, text) from None
    except RecursionError:
        raise ConfigError(f"{name}: invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # a constructor's own failure (an int past 4300 digits)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{name}: invalid YAML: {shown(first)}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return YamlDocument({} if data is None else data, lines, plain)


def _yaml_kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {_value_repr(value)}"
    return f"a {type(value).__name__}"


def _located(exc: ConfigError, path: str, lines: Dict[str, int]) -> ConfigError:
    """``exc`` with `` (FILE:LINE)`` of its key (or of the nearest enclosing key) appended."""
    key = exc.key
    while key and key not in lines:
        key = key[:key.rindex("[")] if key.endswith("]") and "[" in key else None
    if not key:
        return exc
    return ConfigError(f"{exc} ({shown(path)}:{lines[key]})", key=exc.key)


def apply_mapping(cfg: Config, mapping: Dict[str, Any], origin: str,
                  lines: Optional[Dict[str, int]] = None, plain: Optional[Dict[str, str]] = None) -> None:
    """Apply a nested ``{section: {key: value}}`` mapping to ``cfg`` in place. ``lines`` and
    ``plain`` (from a YAML file) locate a bad value and explain a string YAML read as another type."""
    lines, plain = lines or {}, plain or {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{shown(origin)}: the top level must be a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {type(mapping).__name__}")
    for section, values in mapping.items():
        try:
            if section not in SECTIONS:
                raise ConfigError(f"{shown(origin)}: unknown section {shown(repr(section))} "
                                  f"(known: {', '.join(SECTIONS)})", key=str(section))
            if values is None:
                continue
            if not isinstance(values, dict):
                _fail(section, f"a section must be a mapping of keys, got {_value_repr(values)}")
            for key, value in values.items():
                dotted = f"{section}.{key}"
                tp = _field_type(cfg, dotted)
                text = plain.get(dotted)
                if _is_str_field(tp) and value is not None and not isinstance(value, (str, list)) and text:
                    _fail(dotted, f"YAML reads {shown(text)} as {_yaml_kind(value)}, not a string: "
                                  f"quote it (\"{shown(text)}\")")
                set_value(cfg, dotted, value)
        except ConfigError as exc:
            raise _located(exc, origin, lines) from None


# -- overrides -----------------------------------------------------------------------------------

def split_overrides(args: Iterable[str]) -> List[Tuple[str, str]]:
    """``--a.b=v`` or ``--a.b v`` pairs, the values as typed."""
    args = list(args)
    pairs: List[Tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"{shown(arg)}: overrides have the form --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{shown(arg)}: missing value")
            key, raw = body, args[i + 1]
            i += 1
        pairs.append((key, raw))
        i += 1
    return pairs


def parse_value(raw: str) -> Any:
    """An override's text as a YAML value (``1e-3``, ``true``, ``[1, 2]``), the text when not YAML."""
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError):
        value = raw
    # "1e-3" is a str to YAML 1.1; accept numbers written that way (and nan / inf, which the
    # field's check then refuses as not finite).
    if isinstance(value, str):
        try:
            special = value.strip().lstrip("+-").lower() in ("nan", "inf", "infinity")
            value = float(value) if special or any(c in value for c in ".eE") else int(value)
        except (ValueError, OverflowError):
            pass
    return value


def text_value(raw: str, optional: bool) -> Optional[str]:
    """A str field's override: the text as typed; unquoted when quoted YAML's way (``'a b'``); None
    for YAML's null (``null``, ``~``) when the field may be null."""
    stripped = raw.strip()
    if optional and stripped in _YAML_NULLS:
        return None
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        try:
            value = yaml.safe_load(stripped)
        except (yaml.YAMLError, ValueError):
            return raw
        if isinstance(value, str):
            return value
    return raw


def parse_overrides(args: Iterable[str]) -> List[Tuple[str, Any]]:
    """``--a.b=v`` or ``--a.b v`` pairs; values are parsed as YAML scalars (``1e-3``, ``true``).
    (load_config takes a str field's text as typed instead: ``override_value``.)"""
    return [(key, parse_value(raw)) for key, raw in split_overrides(args)]


def override_value(cfg: Config, dotted: str, raw: str) -> Any:
    """The value of the override ``--dotted=raw`` for its field's type."""
    tp = _field_type(cfg, dotted)
    if _is_str_field(tp) and not (_takes_list(tp) and raw.lstrip().startswith("[")):
        return text_value(raw, optional=tp is not str)
    return parse_value(raw)


# -- sources -------------------------------------------------------------------------------------

def resolve_source(source: str) -> Tuple[Path, str, bool]:
    """Map CONFIG (preset name, YAML file, or run directory) to (yaml path, name, is_run_dir)."""
    if not source.strip():
        raise ConfigError(f"CONFIG: must be a preset name, YAML file or run directory, got {source!r}")
    if "\0" in source:
        raise ConfigError(f"{shown(source)}: not a preset, YAML file or run directory (a NUL byte)")
    path = Path(source)
    if path.is_dir():
        cfg_path = path / CONFIG_FILE
        if not cfg_path.is_file():
            raise ConfigError(f"{shown(source)}: a directory given as CONFIG must be a run directory "
                              f"with {CONFIG_FILE}")
        return cfg_path, path.name, True
    if path.is_file():
        return path, path.stem, False
    preset = PRESET_DIR / f"{source}.yaml"
    if preset.is_file():
        return preset, source, False
    raise ConfigError(
        f"{shown(source)}: not a preset, YAML file or run directory (presets: {', '.join(preset_names())})"
    )


def load_config(source: str, overrides: Optional[Iterable[str]] = None) -> Config:
    """Build a Config from CONFIG plus ``--section.key=value`` overrides (not yet validated)."""
    cfg_path, name, is_run_dir = resolve_source(source)
    cfg = Config()
    document = read_yaml(cfg_path)
    apply_mapping(cfg, document.data, str(cfg_path), document.lines, document.plain)
    if is_run_dir:
        # A run directory is where it is now, whatever path it was written under (it may have been
        # moved, or reached from another working directory).
        cfg.run.dir = str(cfg_path.parent)
    for key, raw in split_overrides(overrides or []):
        set_value(cfg, key, override_value(cfg, key, raw))
    if cfg.run.dir is None:
        cfg.run.dir = str(cfg_path.parent) if is_run_dir else os.path.join("runs", name)
    if cfg.run.name == "run":
        cfg.run.name = name
    return cfg


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(mapping: Dict[str, Any]) -> Config:
    cfg = Config()
    apply_mapping(cfg, mapping, "config")
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.dump(config_to_dict(cfg), Dumper=_ConfigDumper, sort_keys=False)
