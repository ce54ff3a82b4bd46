"""Typed dataclass configs: command-line flags, YAML files and overrides built from one declaration.

A field's metadata may give ``help``, ``choices``, ``short`` and ``required``; ``list[...]`` fields
become repeatable flags, ``bool`` fields become ``--flag / --no-flag``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def option(help: str, **extra) -> dict:
    """A config field's metadata: ``field(default=..., metadata=option("what it does", choices=[...]))``."""
    return {"help": help, **extra}


def _base_type(annotation) -> tuple[Any, bool]:
    """(element type, is_list) of an annotation such as ``int | None`` or ``list[str]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple, typing.Sequence):
        return typing.get_args(annotation)[0], True
    return annotation, False


def add_arguments(parser: argparse.ArgumentParser, config_cls: type, all_optional: bool = False) -> None:
    """Add a flag per field. ``all_optional``: no flag is required (values may come from a file)."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        meta = field.metadata
        flag = "--" + field.name.replace("_", "-")
        element, is_list = _base_type(hints[field.name])
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        kwargs: dict[str, Any] = {"dest": field.name, "help": meta.get("help", "")}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if element is bool and not is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = element
            if is_list:
                kwargs["action"] = "append"
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


def from_namespace(config_cls: type[T], namespace: argparse.Namespace) -> T:
    values = {}
    for field in dataclasses.fields(config_cls):
        value = getattr(namespace, field.name, None)
        if value is None:
            continue  # keep the dataclass default (list defaults come from default_factory)
        values[field.name] = value
    return config_cls(**values)


def config_values(config_cls: type, path: str | os.PathLike | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Field values from a YAML file (optional), command-line values taking precedence; unknown fields are errors."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, found {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known fields: {', '.join(sorted(known))}")
    return values
