"""Typed dataclass configs: command-line flags, YAML files and overrides built from one declaration.

A field declared with :func:`option` becomes a flag (one without it is library-only); its metadata
may give ``help``, ``choices``, ``short``, ``metavar``, ``required`` and ``parse`` (a function
``(value, where) -> element`` for element types that are not plain values, such as evaluation
methods). ``list[...]`` fields become repeatable flags, ``bool`` fields ``--flag / --no-flag``,
``Literal[...]`` fields flags with those choices.

Every config, from a YAML file, flags or a mapping, goes through :func:`load_config` (or
:func:`from_namespace`, which shares its checks): each value is coerced to its field's type hint or
refused with a one-line :class:`ConfigError` that names the field, the value and the type expected.
PyYAML reads ``1e-4`` as a string and ``"3"`` stays a string; both become the number the field asks for,
while ``four`` or ``4.7`` for a whole number, and ``maybe`` for a switch, are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

from .files import UnsafeFileError, read_regular_file

T = TypeVar("T")
MAX_CONFIG_BYTES = 4 * 2**20  # a config is a page of text; anything larger is not one
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class ConfigError(ValueError):
    """A config file or value that cannot be used (the CLI prints the message as one line)."""


def option(help: str, **extra) -> dict:
    """A config field's metadata: ``field(default=..., metadata=option("what it does", choices=[...]))``."""
    return {"help": help, **extra}


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _base_type(annotation) -> tuple[Any, bool]:
    """(element type, is_list) of an annotation such as ``int | None`` or ``list[str]``."""
    origin = typing.get_origin(annotation)
    if _is_union(annotation):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple, typing.Sequence):
        return typing.get_args(annotation)[0], True
    return annotation, False


def _describe(annotation) -> str:
    """What a value of ``annotation`` looks like, for messages."""
    if _is_union(annotation):
        args = typing.get_args(annotation)
        described = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(described) + (" or null" if type(None) in args else "")
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if origin in (list, tuple, typing.Sequence):
        return f"a list of {_describe(typing.get_args(annotation)[0])}"
    return {bool: "true or false (yes/no, 1/0)", int: "a whole number (int)", float: "a number (float)",
            str: "text (str)", Path: "a path"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


def coerce(annotation, value: Any, name: str, choices=None, parse: Callable[[Any, str], Any] | None = None) -> Any:
    """``value`` as the type ``annotation`` names, or a :class:`ConfigError` naming ``name``.

    Lists accept a single value (``paths: a.png`` is ``[a.png]``); ``X | None`` accepts null; numbers
    must be finite; ``choices`` (or ``Literal``) restrict the values, element by element for lists.
    """
    if _is_union(annotation):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        for candidate in rest:
            try:
                return coerce(candidate, value, name, choices, parse)
            except ConfigError as err:
                if len(rest) == 1 and not str(err).startswith(f"{name} must be {_describe(candidate)},"):
                    raise  # a specific problem (a choice, a list element): pass it on as it is
        raise ConfigError(f"{name} must be {_describe(annotation)}, got {_show(value)}")
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, typing.Sequence):
        if value is None:
            raise ConfigError(f"{name} must be {_describe(annotation)}, got null; remove the line to use the default")
        element = typing.get_args(annotation)[0]
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        many = isinstance(value, (list, tuple))
        return [coerce(element, v, f"{name}[{i}]" if many else name, choices, parse) for i, v in enumerate(items)]
    if value is None:
        raise ConfigError(f"{name} must be {_describe(annotation)}, got null; remove the line to use the default")
    if origin is Literal:
        allowed = typing.get_args(annotation)
        found = coerce(type(allowed[0]), value, name)
        if found not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(str(a) for a in allowed)}; got {value!r}")
        return found
    if parse is not None:
        found = parse(value, name)
    else:
        found = _scalar(annotation, value, name)
    if choices is not None and found not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(str(c) for c in choices)}; got {value!r}")
    return found


def _scalar(annotation, value: Any, name: str) -> Any:
    wrong = ConfigError(f"{name} must be {_describe(annotation)}, got {_show(value)}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise wrong
    if annotation is int:
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
            try:
                value = float(value.strip())  # "1e3", "4.0"
            except ValueError:
                raise wrong from None
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise wrong
    if annotation is float:
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise wrong from None
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
            return float(value)
        raise wrong
    if annotation in (str, Path):
        # YAML reads `output_dir: 2024-05-01` as a date and `model: 15` as a number; both are fine names.
        if isinstance(value, (str, int, float, datetime.date)) and not isinstance(value, bool):
            return annotation(str(value)) if not isinstance(value, str) else annotation(value)
        raise wrong
    if annotation is Any or (isinstance(annotation, type) and isinstance(value, annotation)):
        return value
    raise wrong


def add_arguments(parser: argparse.ArgumentParser, config_cls: type, all_optional: bool = False) -> None:
    """Add a flag per field declared with :func:`option` (fields without it are library-only, e.g.
    extra pipeline arguments). ``all_optional``: no flag is required (values may come from a file)."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        meta = field.metadata
        if "help" not in meta:
            continue
        flag = "--" + field.name.replace("_", "-")
        element, is_list = _base_type(hints[field.name])
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        kwargs: dict[str, Any] = {"dest": field.name, "help": meta.get("help", "")}
        choices = meta.get("choices")
        if typing.get_origin(element) is Literal:
            choices = list(typing.get_args(element))
            element = type(choices[0])
        if choices is not None:
            kwargs["choices"] = choices
        if element is bool and not is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            # Values of other types (e.g. evaluation methods) stay strings here; their field's
            # ``parse`` reads them in load_config, with the same messages as a YAML entry gets.
            kwargs["type"] = element if element in (int, float, str, Path) else str
            if is_list:
                kwargs["action"] = "append"
            if choices is None:  # a metavar would hide the choices in --help
                kwargs["metavar"] = meta.get("metavar", field.name.upper())
        if not all_optional and meta.get("required", not has_default):
            kwargs["required"] = True
        default = field.default if field.default is not dataclasses.MISSING else None
        # With all_optional, unset flags stay None so they do not override a config file's values.
        kwargs["default"] = None if (is_list or all_optional) else default
        if default not in (None, "") and kwargs["help"] and not is_list:
            kwargs["help"] += f" (default: {default})"
        names = [flag] + ([meta["short"]] if "short" in meta else [])
        parser.add_argument(*names, **kwargs)


def _coerce_values(config_cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(str(k) for k in values if k not in fields)
    if unknown:
        raise ConfigError(f"{where}unknown config field(s) {unknown}; known fields: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(config_cls)
    coerced = {}
    for name, value in values.items():
        meta = fields[name].metadata
        try:
            coerced[name] = coerce(hints[name], value, name, meta.get("choices"), meta.get("parse"))
        except ConfigError as err:
            raise ConfigError(f"{where}{err}") from None
    return coerced


def make_config(config_cls: type[T], values: dict[str, Any]) -> T:
    """``config_cls(**values)`` with every value coerced to its field's type; unknown fields are errors."""
    return config_cls(**_coerce_values(config_cls, values, ""))


def from_namespace(config_cls: type[T], namespace: argparse.Namespace) -> T:
    """The config of parsed flags (flags not given keep the dataclass defaults)."""
    values = {}
    for field in dataclasses.fields(config_cls):
        value = getattr(namespace, field.name, None)
        if value is None:
            continue  # keep the dataclass default (list defaults come from default_factory)
        values[field.name] = value
    return make_config(config_cls, values)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The field values of a YAML file (a mapping); every problem is a one-line :class:`ConfigError`."""
    import yaml

    path = Path(path)
    try:
        data = read_regular_file(path, MAX_CONFIG_BYTES, what="config file")
    except UnsafeFileError as err:
        raise ConfigError(str(err)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML: {problem}{at}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        kind = {list: "a list", str: "text"}.get(type(loaded), type(loaded).__name__)
        raise ConfigError(f"{path}: expected a mapping of config fields (name: value), found {kind}")
    return loaded


def load_config(config_cls: type[T], path: str | os.PathLike | None = None,
                overrides: dict[str, Any] | None = None) -> T:
    """The config from a YAML file (optional) and overrides (flags; ``None`` values are not given),
    the overrides taking precedence. The one way every command reads its config."""
    file_values = read_config_file(path) if path is not None else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    # File values are checked with the file's name in their messages.
    where = f"{Path(path).name}: " if path is not None else ""
    values = _coerce_values(config_cls, {k: v for k, v in file_values.items() if k not in given}, where)
    values.update(_coerce_values(config_cls, given, ""))
    return config_cls(**values)
