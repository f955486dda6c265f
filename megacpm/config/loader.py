"""Reading configs: presets, YAML files, run directories and dotted overrides, with strict typing.

Every problem is a :class:`ConfigError` whose message names the offending key, so the CLI can print
one line and exit before anything is created.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import yaml

from megacpm.config.schema import SECTIONS, Config
from megacpm.io.run_dir import CONFIG_FILE

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key and the problem."""


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


def check_choice(key: str, value: Any, tp: Any) -> Any:
    """``value`` when it is one of the choices of the Literal type ``tp``, else one ConfigError."""
    choices = typing.get_args(tp)
    # Equality alone would let True stand for 1 (or 1.0 for 1); the type must match too.
    if any(value == choice and type(value) is type(choice) for choice in choices):
        return value
    raise ConfigError(f"{key}: must be one of {', '.join(str(c) for c in choices)}, got {value!r}")


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
            except ConfigError:
                continue
        literals = [a for a in args if typing.get_origin(a) is typing.Literal]
        if len(literals) == 1 and len(args) == 2:  # Optional[Literal[...]]: the choices' own message
            _coerce(key, value, literals[0])
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, List):
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (dict, Dict) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e6 written for an integer field
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _section_fields(section_obj: Any) -> Dict[str, Any]:
    hints = typing.get_type_hints(type(section_obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(section_obj)}


def apply_mapping(cfg: Config, mapping: Dict[str, Any], origin: str) -> None:
    """Apply a nested ``{section: {key: value}}`` mapping to ``cfg`` in place."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(mapping).__name__}")
    for section, values in mapping.items():
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section '{section}' (known: {', '.join(SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section '{section}' must be a mapping")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{dotted}: config keys have the form section.key")
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(f"{dotted}: unknown section '{section}' (known: {', '.join(SECTIONS)})")
    section_obj = getattr(cfg, section)
    fields = _section_fields(section_obj)
    if key not in fields:
        raise ConfigError(f"{dotted}: unknown key (known in '{section}': {', '.join(fields)})")
    setattr(section_obj, key, _coerce(dotted, value, fields[key]))


def parse_overrides(args: Iterable[str]) -> List[Tuple[str, Any]]:
    """``--a.b=v`` or ``--a.b v`` pairs; values are parsed as YAML scalars (``1e-3``, ``true``)."""
    args = list(args)
    pairs: List[Tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"{arg}: overrides have the form --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg}: missing value")
            key, raw = body, args[i + 1]
            i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # "1e-3" is a str to YAML 1.1; accept numbers written that way.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        pairs.append((key, value))
        i += 1
    return pairs


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML") from None
    return data or {}


def resolve_source(source: str) -> Tuple[Path, str, bool]:
    """Map CONFIG (preset name, YAML file, or run directory) to (yaml path, name, is_run_dir)."""
    path = Path(source)
    if path.is_dir():
        cfg_path = path / CONFIG_FILE
        if not cfg_path.is_file():
            raise ConfigError(f"{source}: a directory given as CONFIG must be a run directory with {CONFIG_FILE}")
        return cfg_path, path.name, True
    if path.is_file():
        return path, path.stem, False
    preset = PRESET_DIR / f"{source}.yaml"
    if preset.is_file():
        return preset, source, False
    raise ConfigError(
        f"{source}: not a preset, YAML file or run directory (presets: {', '.join(preset_names())})"
    )


def load_config(source: str, overrides: Optional[Iterable[str]] = None) -> Config:
    """Build a Config from CONFIG plus ``--section.key=value`` overrides (not yet validated)."""
    cfg_path, name, is_run_dir = resolve_source(source)
    cfg = Config()
    apply_mapping(cfg, _read_yaml(cfg_path), str(cfg_path))
    if is_run_dir:
        # A run directory is where it is now, whatever path it was written under (it may have been
        # moved, or reached from another working directory).
        cfg.run.dir = str(cfg_path.parent)
    for key, value in parse_overrides(overrides or []):
        set_value(cfg, key, value)
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
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
