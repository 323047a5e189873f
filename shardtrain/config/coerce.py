"""One YAML / flag value -> the run-config field's type, or a one-line ConfigError (key, value, fix).

The field types of config/schema.py are plain types, enums (compiler/specs.py) and the marker types
below; an unknown key gets the nearest valid one (difflib).
"""
from __future__ import annotations

import difflib
import enum
import math
import types
import typing

from shardtrain.units import parse_bytes, parse_count


class ConfigError(ValueError):
    """A bad run config value: the message names the key, the value and a fix."""


# Marker types for parsing (keep the dataclasses readable).
Bytes = typing.NewType("Bytes", int)      # "80GiB" | 8.6e10
Count = typing.NewType("Count", int)      # 7.5e9 | "7.5B"
AutoInt = typing.NewType("AutoInt", int)  # "auto" (-> None) | positive int
AutoOffInt = typing.NewType("AutoOffInt", int)  # "auto" (-> None) | "off" (-> 1) | positive int (train.tiled_mlp)


class Auto(str, enum.Enum):
    """The config-only choice "auto" beside an enum of the compiler (train.strategy: Auto | Strategy):
    config/resolve.py turns it into None (the planner chooses)."""
    AUTO = "auto"

    def __str__(self) -> str:
        return self.value


def nearest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" — did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _is_enum(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def _enum(key: str, enums: list, value):
    """A member of the first enum (of a union) that has ``value``, case-insensitively."""
    text = str(value).lower()
    for tp in enums:
        if text in (m.value for m in tp):
            return tp(text)
    valid = [m.value for tp in enums for m in tp]
    close = difflib.get_close_matches(text, valid, n=1, cutoff=0.5)
    hint = f" — did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"{key}: {value!r} is not valid{hint} (valid: {', '.join(valid)})")


def _number(key: str, value, kind: str, example: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not {kind}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not {kind}; write e.g. {example}") from None
    if not math.isfinite(f):  # int(inf) is an OverflowError (issue 13: seq_len: 1e400)
        raise ConfigError(f"{key}: {value!r} is not a finite {kind.split()[-1]}; write e.g. {example}")
    return f


def _one_name_as_str(args, value):
    """``tuple[str, ...] | str`` (lora.targets): one name is kept as the name, several as a tuple. One
    canonical form, so a config written back (to_dict, run.yaml) and read again equals the original:
    the default ``"all-linear"`` read back as ``("all-linear",)`` looked like a lora section the user
    wrote (config/ignored.py warned about it, the resume check saw a changed LoRA shape)."""
    if str in args and isinstance(value, tuple) and len(value) == 1:
        return value[0]
    return value


def coerce(key: str, tp, value):
    """Convert one YAML/flag value to the field's type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in typing.get_args(tp):
                return None
        if (AutoInt in args or AutoOffInt in args) and isinstance(value, str) and value.lower() == "auto":
            return None
        if all(_is_enum(a) for a in args):  # e.g. auto | a strategy: one message listing all choices
            return _enum(key, args, value)
        errors = []
        for a in args:
            try:
                return _one_name_as_str(args, coerce(key, a, value))
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is Bytes:
        try:
            return parse_bytes(value, key=key)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if tp is Count:
        try:
            n = parse_count(value, key=key)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if n <= 0:
            raise ConfigError(f"{key}: {value!r} must be positive, e.g. 7.5e9")
        return n
    if _is_enum(tp):
        return _enum(key, [tp], value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: {value!r} is not a boolean; write true or false")
    if tp is AutoOffInt and isinstance(value, str) and value.strip().lower() == "off":
        return 1
    if tp is AutoOffInt and isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
        raise ConfigError(f"{key}: {value!r} is not valid (valid: auto, off, or a whole number of tiles >= 2, e.g. 8)")
    if tp in (int, AutoInt, AutoOffInt):
        f = _number(key, value, "an integer", f"{key.split('.')[-1]}: 4")
        if f != int(f):
            raise ConfigError(f"{key}: {value!r} is not a whole number")
        return int(f)
    if tp is float:
        return _number(key, value, "a number", "3e-4")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
        return str(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
        return tuple(str(v) for v in value)
    raise ConfigError(f"{key}: unsupported type {tp}")
