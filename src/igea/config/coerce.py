"""How a loose YAML value becomes a typed one: a section's dataclass built from a mapping, each value checked
against its type hint and converted where YAML is loose (`5e-5` is a string in YAML 1.1, `no` is false), an
unknown key named with the keys that are allowed.

Every section is built through here (`build_section`, `Section.__post_init__`), and so are the `training:`
section against `transformers.TrainingArguments` and igea's task files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import math
import types
import typing
from typing import Any

from igea.errors import ConfigError, show


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """The dataclass `cls` from a mapping, every value type-checked; errors name `prefix` + the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {show(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(_unknown_key(f"{prefix}{key}", str(key), names))
    values = {name: _coerce(raw[name], hints[name], f"{prefix}{name}") for name in names if name in raw}
    try:
        return cls(**values)
    except TypeError as err:  # a required field is missing
        missing = str(err).split("argument")[-1].strip(": '")
        raise ConfigError(f"{prefix.rstrip('.')}: missing required key '{missing}'") from None


def _unknown_key(full_key: str, key: str, allowed: list[str], described: str | None = None) -> str:
    close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.6)
    if close:
        hint = f"did you mean {', '.join(repr(c) for c in close)}?"
    else:
        hint = f"allowed: {described or ', '.join(allowed)}"
    return f"unknown key '{show(full_key)[1:-1]}'; {hint}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint, converting where YAML is loose (`5e-5` is a string in YAML 1.1)."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if sections and isinstance(value, sections[0]):
            return value
        if sections and isinstance(value, dict):  # `TinyModelConfig | None`: the section's own errors name the key
            return build_section(sections[0], value, f"{key}.")
        lists = [a for a in args if typing.get_origin(a) is list and dataclasses.is_dataclass(typing.get_args(a)[0])]
        if lists:  # `list[SourceConfig] | None`: each entry's own errors name its key
            return _coerce(value, lists[0], key)
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:  # `SchedulerType | str`: the string must still be one of the enum's values
            return _coerce(value, enums[0], key)
        candidates = [a for a in args if a is not type(None)]
        exact = [a for a in candidates if type(value) is a]  # `float | int` keeps an int an int
        for arg in exact + candidates:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {show(value)}")
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(hint)}, got {show(value)}")
        if len(args) != 2 or args[1] is Any:
            return dict(value)
        for name in value:
            if not isinstance(name, str):
                raise ConfigError(f"{key}: {show(name)} is not allowed as a key; keys are names (text)")
        return {name: _coerce(v, args[1], f"{key}.{name}") for name, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build_section(hint, value, f"{key}.")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        if isinstance(value, hint):
            return value.value
        if value is False and "no" in allowed:  # YAML 1.1 reads a bare `no` as false
            return "no"
        if value not in allowed:
            raise ConfigError(f"{key}: {show(value)} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    return _coerce_scalar(value, hint, key)


def _coerce_scalar(value: Any, hint: type, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: {value} is not allowed; it must be a finite number")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {show(value)}")


def _type_name(hint: Any, plural: bool = False) -> str:
    """How an error names a type hint: `a string or a list of strings or null`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list or hint is list:
        return ("lists" if plural else "a list") + (f" of {_type_name(args[0], plural=True)}" if args else "")
    if origin is dict or hint is dict:
        values = f" (name: {_type_name(args[1])})" if len(args) == 2 and args[1] is not Any else ""
        return ("mappings" if plural else "a mapping") + values
    if args:
        return " or ".join(_type_name(a, plural) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else ""
        )
    names = {bool: ("true/false", "true/false values"), int: ("an integer", "integers"),
             float: ("a number", "numbers"), str: ("a string", "strings")}
    if hint in names:
        return names[hint][plural]
    return getattr(hint, "__name__", str(hint))
