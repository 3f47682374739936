"""Checking a recipe value against a type annotation (ours, or an upstream class's), and naming the type in errors."""

from __future__ import annotations

import enum
import types
import typing
from typing import Any, Literal

__all__ = ["type_name", "type_ok"]



def type_name(typ: Any) -> str:
    origin = typing.get_origin(typ)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(typ))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(typ))
    if origin in (list, tuple, set):
        args = typing.get_args(typ)
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if typ is type(None):
        return "null"
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        return " | ".join(repr(m.value) for m in typ)
    return getattr(typ, "__name__", str(typ))


def type_ok(value: Any, typ: Any) -> tuple[bool, Any]:
    """Is ``value`` acceptable for ``typ``? Returns (ok, value converted where harmless: a whole float such as
    ``100.0`` or ``1e3`` -> int for an int field). An int stays an int in a float field (``logging_steps: 5``, a
    count there, not a ratio), so the resolved recipe prints what was written."""
    if typ is Any or typ is typing.Any:
        return True, value
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(typ):
            ok, conv = type_ok(value, arg)
            if ok:
                return True, conv
        return False, value
    if origin is Literal:
        for a in typing.get_args(typ):
            if value == a and type(value) is type(a):
                return True, value
        return False, value
    if origin in (list, tuple, set):
        if not isinstance(value, list):
            return False, value
        args = typing.get_args(typ)
        if not args:
            return True, value
        conv = []
        for v in value:
            ok, c = type_ok(v, args[0])
            if not ok:
                return False, value
            conv.append(c)
        return True, conv
    if origin is dict or typ is dict:
        return isinstance(value, dict), value
    if typ is type(None):
        return value is None, value
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if typ is str:
        return isinstance(value, str), value
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        values = [m.value for m in typ]
        return value in values, value
    if isinstance(typ, type):
        return isinstance(value, typ), value
    return True, value  # an annotation we cannot check (a forward reference): leave it to the upstream class
