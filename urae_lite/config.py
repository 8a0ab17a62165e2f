"""The one config system of urae_lite: YAML files of plain settings checked against dataclasses, `key=value`
overrides with dotted keys, and `_component_` sections that name a callable.

Training recipes (urae_lite/train/config.py) and generation presets (urae_lite/presets.py) are both read here, so
both take the same `key=value` overrides, report a misspelled key the same way, and may carry `profiles:`, the
memory settings for common card sizes (urae_lite/plan/profiles.py writes and checks them).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import UraeError

REQUIRED = "???"
PROFILES_KEY = "profiles"


def read_yaml(path: str | os.PathLike, what: str) -> dict:
    """A YAML mapping, or one UraeError naming the file and the problem (`what`: recipe, preset, ...)."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise UraeError(f"cannot read {what} {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise UraeError(f"{what} {path} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise UraeError(f"{what} {path} must be a mapping of setting: value")
    return tree


def apply_overrides(tree: dict, overrides: typing.Iterable[str]) -> dict:
    """`tree` with each `dotted.key=value` (YAML value) set in place."""
    for text in overrides:
        _set_path(tree, *_parse_override(text))
    return tree


def override_keys(overrides: typing.Iterable[str]) -> set[str]:
    """The dotted keys that `key=value` overrides set."""
    return {o.split("=", 1)[0].strip() for o in overrides}


def build(cls: type, values: dict, prefix: str = "") -> Any:
    """A dataclass instance from a mapping: unknown keys are an error naming the known ones, values are coerced
    to the declared types, nested dataclasses are built from nested mappings."""
    return _build(cls, values, prefix)


def missing(obj: Any) -> list[str]:
    """Dotted names of settings still at REQUIRED."""
    return _missing(obj)


def profiles(tree: dict, what: str) -> dict[int, dict[str, Any]]:
    """The `profiles:` section: card size in GiB -> settings (dotted keys for recipes, option names for presets)."""
    section = tree.get(PROFILES_KEY) or {}
    if not isinstance(section, dict) or not all(isinstance(v, dict) for v in section.values()):
        raise UraeError(f"{what}: profiles must map a card size in GiB to a mapping of settings")
    try:
        return {int(k): dict(v) for k, v in section.items()}
    except (TypeError, ValueError):
        raise UraeError(
            f"{what}: profile names must be card sizes in GiB (8, 12, ...), got {', '.join(map(str, section))}"
        ) from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UraeError(f"override '{text}' is not key=value (e.g. training.steps=100)")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise UraeError(f"cannot set {'.'.join(path)}: {part} is a value, not a section")
        tree = node
    tree[path[-1]] = value


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """YAML reads `1e-4` as a string and `16` as an int; fit values to the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, options[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UraeError(f"{key} must be true or false, got {value!r}")
    if annotation in (int, float):
        try:
            number = float(value) if isinstance(value, str) else value
            if annotation is int and (isinstance(number, bool) or float(number) != int(number)):
                raise ValueError
            return annotation(number)
        except (TypeError, ValueError):
            raise UraeError(f"{key} must be a number ({annotation.__name__}), got {value!r}") from None
    if annotation is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes as booleans
            return "on" if value else "off"
        if isinstance(value, (dict, list)) or value is None:
            raise UraeError(f"{key} must be a string, got {value!r}")
        return str(value)
    if origin is list:
        if value is None:
            return []
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, typing.get_args(annotation)[0], key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UraeError(f"{key} must be a mapping, got {value!r}")
        return {
            k: (
                _number(v)
                if typing.get_args(annotation)[1] is Any
                else _coerce(v, typing.get_args(annotation)[1], f"{key}.{k}")
            )
            for k, v in value.items()
        }
    return value


def _number(value: Any) -> Any:
    """Component kwargs are untyped: turn numeric strings such as '1e-4' into floats, leave the rest."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise UraeError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UraeError(f"unknown setting '{prefix}{unknown[0]}' (known in this section: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if isinstance(value, str) and value == REQUIRED:
            kwargs[name] = REQUIRED
        elif dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _missing(obj: Any, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _missing(value, f"{prefix}{f.name}.")
        elif value == REQUIRED:
            out.append(f"{prefix}{f.name}")
    return out


def instantiate(section: dict[str, Any], *args: Any) -> Any:
    """Call the `_component_` of a recipe section with `args` and the section's other keys."""
    path = section["_component_"]
    module_name, _, attr = str(path).rpartition(".")
    try:
        component = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        hint = " (pip install prodigyopt, or pip install urae-lite[train])" if "prodigy" in str(path) else ""
        raise UraeError(f"cannot import component {path}{hint}: {e}") from e
    kwargs = {k: v for k, v in section.items() if k != "_component_"}
    try:
        return component(*args, **kwargs)
    except TypeError as e:
        raise UraeError(f"{path} does not accept these settings {sorted(kwargs)}: {e}") from e
