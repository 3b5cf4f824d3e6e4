"""Options of a config dataclass, declared once: default, help text and bounds on the field.

A trainable method's ``Config`` (:mod:`awt_engine.methods`) and an adaptation's
(:mod:`awt_engine.adapt`) declare each option with :func:`option` (as peft's
``LoraConfig`` keeps its help on its fields). The same few functions serve both: the help
listed by ``awt-engine methods --verbose`` / ``scorers --verbose``, the ``--set
NAME=VALUE`` strings read into the field's type (:func:`apply_options`), and the checks
that run before any model loads (:func:`check_values`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any


def option(default, help: str = "", *, bounds: tuple | None = None):
    """A Config field with its help text (what ``awt-engine methods --verbose`` prints, as
    peft's ``LoraConfig`` keeps its help on its fields) and, for the sizes a method
    allocates from, the ``bounds`` [low, high] its value must lie in: an absurd value
    (``--set n_ctx=100000000``, a crafted checkpoint) is refused by :func:`check_values`
    before any tensor is made."""
    metadata = {"help": help} if bounds is None else {"help": help, "bounds": tuple(bounds)}
    return field(default=default, metadata=metadata)


def bounded(default, low, high, help: str = ""):
    """:func:`option` with ``bounds=(low, high)``."""
    return option(default, help, bounds=(low, high))


def option_help(config_type: type) -> dict[str, str]:
    """Field name -> help text of the Config dataclass ``config_type`` (its :func:`option`
    metadata; "" where a field has none)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(config_type)}


def check_config(config) -> None:
    """:func:`check_values` of every field of the Config dataclass instance ``config``."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    check_values(type(config), values)


def check_values(config_type: type, values: Mapping[str, Any]) -> None:
    """ValueError naming the first of ``values`` (field name -> value) that does not fit
    its field of the Config dataclass ``config_type``: not of the field's type (str, int,
    float, bool or None as annotated), a number that is not finite, or outside the field's
    :func:`bounded` range. Cheap: run before the Config is built (a checkpoint's header)
    and before any model is."""
    hints = typing.get_type_hints(config_type)
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    for name, value in values.items():
        if name not in fields:
            continue
        hint = hints.get(name)
        if not _fits(value, hint):
            raise ValueError(f"{name} must be {_kind(hint)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        bounds = fields[name].metadata.get("bounds")
        if bounds is not None and value is not None and not bounds[0] <= value <= bounds[1]:
            raise ValueError(f"{name} must be between {bounds[0]} and {bounds[1]}, got {value!r}")


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a text"}


def _fits(value, hint) -> bool:
    if isinstance(hint, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, hint) if hint in _KINDS else True  # others: the Config's own


def _kind(hint) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_kind(h) for h in typing.get_args(hint))
    return "none" if hint is type(None) else _KINDS.get(hint, str(hint))


def convert(config_type: type, name: str, value: Any) -> Any:
    """``value`` for field ``name`` of ``config_type``: a ``--set`` string read as the
    field's type (bool, int, float, None, a number union, a float tuple); anything that
    is not a string as it is. ValueError naming the option when it cannot be read."""
    if not isinstance(value, str):
        return value
    kind = typing.get_type_hints(config_type).get(name, str)
    text = value.strip()
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if text.lower() == "none":
            return None
        for candidate in typing.get_args(kind):
            if candidate in (int, float):
                return candidate(text)
        if typing.get_origin(kind) is tuple:
            return tuple(float(x) for x in text.split(","))
        return text
    except ValueError:
        raise ValueError(f"option {name}: cannot read {value!r} as {kind}") from None


def apply_options(config, options: Mapping[str, Any] | None, owner: str):
    """``config`` (a frozen dataclass instance) with ``options`` (name -> value; strings
    as ``--set`` gives them, ``-`` and ``_`` alike) applied and checked; ValueError naming
    ``owner``, an unknown name with the known ones, or a bad value."""
    fields = {f.name for f in dataclasses.fields(config)}
    over = {}
    for raw, value in (options or {}).items():
        name = str(raw).replace("-", "_")
        if name not in fields:
            raise ValueError(f"unknown option {raw!r} for {owner}; options: {', '.join(fields)}")
        over[name] = convert(type(config), name, value)
    try:
        out = dataclasses.replace(config, **over)
        check_config(out)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{owner}: {exc}") from None
    return out


__all__ = [
    "apply_options",
    "bounded",
    "check_config",
    "check_values",
    "convert",
    "option",
    "option_help",
]
