"""Typed, validated configuration: dataclasses loaded from YAML, overridable with ``a.b=c``.

Every section is a plain (keyword-only) dataclass that validates itself in ``__post_init__``
by calling :func:`check` / raising :class:`ConfigError` with the *field name*; the loader
prefixes the section path, so the user sees ``model.num_heads=6: must divide ...``.

Traps:
- YAML ``1e-3`` is a string for PyYAML (YAML 1.1); :func:`_coerce` turns numeric strings
  into floats/ints when the field is typed so.
- Overrides are parsed with ``yaml.safe_load`` so ``a.b=[1,2]``, ``a.b=true`` and
  ``a.b=null`` work; a value that should stay a string may need quotes.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from megamoe.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A configuration value is invalid. ``field`` is the dotted path from the root."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r}: {allowed}")

    def prefixed(self, prefix: str) -> "ConfigError":
        return ConfigError(f"{prefix}.{self.field}" if prefix else self.field, self.value, self.allowed)


def check(condition: bool, field: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, value, allowed)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` to type ``tp`` (from a dataclass annotation) or raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except ConfigError as e:
                errors.append(e.allowed)
        raise ConfigError(path, value, " or ".join(errors))
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(path, value, "must be " + _type_name(tp))
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        raise ConfigError(path, value, f"must be a list of {_type_name(item_tp)}")
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(path, value, "must be a mapping")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, value, f"must be a mapping of {tp.__name__} fields")
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(path, value, "must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(path, value, "must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(path, value, "must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(path, value, "must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(path, value, "must be a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(path, value, "must be a string")
    return value


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclass fields.

    Unknown keys raise ConfigError naming the full path and the closest valid key.
    Validation errors raised by ``__post_init__`` get the section path prefixed.
    """
    if not isinstance(data, dict):
        raise ConfigError(path or "<root>", data, f"must be a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(full, value, f"unknown key in {cls.__name__} (valid: {', '.join(fields)}){hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.prefixed(path) from None


def to_dict(obj: Any) -> Any:
    """Plain-python (YAML/JSON-serialisable) view of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_overrides(overrides: list[str]) -> dict:
    """``["model.hidden_size=512", "moe.layers=[1,3]"]`` -> nested dict."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, item, "overrides are written section.field=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, raw, "conflicts with another override of a parent key")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pick one of configs/*.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from an optional YAML file plus ``a.b=c`` overrides."""
    data = load_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)
