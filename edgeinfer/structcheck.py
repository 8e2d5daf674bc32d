"""Untyped data (YAML, JSON) into msgspec Structs, with errors in our own words.

msgspec converts well but words its errors its own way, and that wording changes between
releases (0.23 reworded several). Anything shown to a person with a key path (configs,
manifests, pipeline settings) therefore goes through `convert` here: it walks the
Struct's fields itself (msgspec.inspect.type_info) and reports the first unknown key,
missing key or ill-typed value as a `StructError` with a key path (`jobs.workers`,
`models[0].sha256`) and a message that are ours. Only then does msgspec build the Struct,
from data already known to fit, so its own messages never reach a user.

`lax` accepts what a person types into YAML or an environment variable: numbers and
booleans written as strings ("4", "1e3", "true") and whole floats for integers. The
walker does that coercion itself, and msgspec then converts strictly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec
import msgspec.inspect as mi

T = TypeVar("T")

_TRUE = {"true", "1"}
_FALSE = {"false", "0"}
# How much of a bad string value a message repeats.
_SHOWN_CHARS = 60


class StructError(ValueError):
    """One problem at one key path; `str()` is `key 'a.b[0]': what is wrong`."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"key '{path}': {problem}" if path else problem)
        self.path = path
        self.problem = problem


def convert(data: Any, cls: type[T], *, lax: bool = False) -> T:
    """`data` as a `cls` (a Struct), or a StructError naming the key path."""
    checked = _walk(data, _type_info(cls), (), lax)
    try:
        return msgspec.convert(checked, cls)
    except msgspec.ValidationError as exc:
        # A type the walker does not know (none used here today); say so honestly.
        raise StructError("", f"not accepted: {exc}") from None


def wants_text(cls: type[Any], path: Sequence[str]) -> bool:
    """Whether the field at `path` (keys, from `cls`) takes a string and no number.

    Environment overrides use it: EDGE_AGENT_DEVICE_ID=1234 stays the string "1234".
    """
    info: mi.Type = _type_info(cls)
    for key in path:
        struct = _struct_of(info)
        if struct is None:
            return False
        by_name = {f.encode_name: f.type for f in struct.fields}
        if key not in by_name:
            return False
        info = by_name[key]
    members = info.types if isinstance(info, mi.UnionType) else (info,)
    return any(isinstance(m, mi.StrType) for m in members) and not any(
        isinstance(m, (mi.IntType, mi.FloatType, mi.BoolType)) for m in members)


def not_utf8(data: bytes | memoryview) -> str | None:
    """Why `data` is not UTF-8 ("invalid continuation byte at byte 7"), or None if it is.

    msgspec reports bad UTF-8 inside a JSON string differently from one release to the
    next (a UnicodeDecodeError, or a DecodeError of its own wording); callers that got a
    DecodeError ask this to say which it was.
    """
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"{exc.reason} at byte {exc.start}"
    return None


_INFO: dict[Any, mi.Type] = {}


def _type_info(cls: Any) -> mi.Type:
    # type_info walks every nested type: once per class, not once per message.
    info = _INFO.get(cls)
    if info is None:
        info = _INFO[cls] = mi.type_info(cls)
    return info


def _struct_of(info: mi.Type) -> mi.StructType | None:
    if isinstance(info, mi.StructType):
        return info
    if isinstance(info, mi.UnionType):
        structs = [m for m in info.types if isinstance(m, mi.StructType)]
        return structs[0] if len(structs) == 1 else None
    return None


# --- the walk ------------------------------------------------------------------------------

Path = tuple[str | int, ...]


def _render(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _fail(path: Path, info: mi.Type, value: Any) -> StructError:
    return StructError(_render(path), f"expected {describe(info)}, got {_shown(value)}")


def _walk(value: Any, info: mi.Type, path: Path, lax: bool) -> Any:
    """`value` checked against `info`: returned as msgspec may take it, or StructError."""
    if isinstance(info, mi.StructType):
        return _struct(value, info, path, lax)
    if isinstance(info, mi.UnionType):
        return _union(value, info, path, lax)
    if isinstance(info, (mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType)):
        items = _sequence(value, info, path)
        return [_walk(v, info.item_type, (*path, i), lax) for i, v in enumerate(items)]
    if isinstance(info, mi.TupleType):
        if not isinstance(value, (list, tuple)) or len(value) != len(info.item_types):
            raise _fail(path, info, value)
        pairs = enumerate(zip(value, info.item_types, strict=True))
        return [_walk(v, t, (*path, i), lax) for i, (v, t) in pairs]
    if isinstance(info, mi.DictType):
        return _dict(value, info, path, lax)
    if isinstance(info, mi.NoneType):
        if value is not None:
            raise _fail(path, info, value)
        return None
    if isinstance(info, mi.LiteralType):
        # By type as well as value: True == 1 in Python, not in JSON.
        if not any(type(v) is type(value) and v == value for v in info.values):
            raise _fail(path, info, value)
        return value
    checker = _SCALARS.get(type(info))
    # AnyType, and kinds no struct here uses: msgspec decides (convert says so if it refuses).
    return value if checker is None else checker(value, info, path, lax)


def _struct(value: Any, info: mi.StructType, path: Path, lax: bool) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, info, value)
    fields = {f.encode_name: f for f in info.fields}
    if info.forbid_unknown_fields:
        for key in value:
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise StructError(_render((*path, str(key))), f"unknown key (known keys: {known})")
    out: dict[str, Any] = dict(value)
    for name, field in fields.items():
        if name in value:
            out[name] = _walk(value[name], field.type, (*path, name), lax)
        elif field.required:
            raise StructError(_render((*path, name)), "required key is missing")
    return out


def _union(value: Any, info: mi.UnionType, path: Path, lax: bool) -> Any:
    if value is None and any(isinstance(m, mi.NoneType) for m in info.types):
        return None
    fitting = [m for m in info.types if _shape_fits(value, m)]
    if not fitting and lax:
        fitting = [m for m in info.types if isinstance(m, (mi.IntType, mi.FloatType, mi.BoolType))]
    for member in fitting:
        try:
            return _walk(value, member, path, lax)
        except StructError as exc:
            # A problem deeper down (a key inside a struct) is more use than "expected A or B".
            if len(fitting) == 1 and exc.path != _render(path):
                raise
    raise _fail(path, info, value)


def _shape_fits(value: Any, info: mi.Type) -> bool:
    """Whether `value` is the right kind of JSON value for `info`, constraints aside."""
    if isinstance(info, mi.AnyType):
        return True
    if isinstance(value, dict):
        return isinstance(info, (mi.StructType, mi.DictType))
    if isinstance(value, (list, tuple)):
        return isinstance(info, (mi.ListType, mi.VarTupleType, mi.TupleType, mi.SetType,
                                 mi.FrozenSetType))
    if isinstance(value, bool):
        return isinstance(info, (mi.BoolType, mi.LiteralType))
    if isinstance(value, int):
        return isinstance(info, (mi.IntType, mi.FloatType, mi.LiteralType))
    if isinstance(value, float):
        return isinstance(info, mi.FloatType)
    if isinstance(value, str):
        return isinstance(info, (mi.StrType, mi.LiteralType))
    return False


def _sequence(value: Any, info: Any, path: Path) -> Sequence[Any]:
    if not isinstance(value, (list, tuple)):
        raise _fail(path, info, value)
    _check_length(len(value), info, path, value)
    return value


def _dict(value: Any, info: mi.DictType, path: Path, lax: bool) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise _fail(path, info, value)
    _check_length(len(value), info, path, value)
    out: dict[Any, Any] = {}
    for key, item in value.items():
        where = (*path, str(key))
        if not _shape_fits(key, info.key_type):
            raise StructError(_render(where), f"a key must be {describe(info.key_type)}")
        out[_walk(key, info.key_type, where, lax)] = _walk(item, info.value_type, where, lax)
    return out


def _check_length(n: int, info: Any, path: Path, value: Any) -> None:
    low, high = info.min_length, info.max_length
    if (low is not None and n < low) or (high is not None and n > high):
        raise _fail(path, info, value)


def _int(value: Any, info: mi.IntType, path: Path, lax: bool) -> int:
    number = value
    if lax and isinstance(value, str):
        number = _parse_number(value)
    if lax and isinstance(number, float) and number.is_integer():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int) or not _bounded(number, info):
        raise _fail(path, info, value)
    if info.multiple_of is not None and number % info.multiple_of:
        raise _fail(path, info, value)
    return number


def _float(value: Any, info: mi.FloatType, path: Path, lax: bool) -> float:
    number = _parse_number(value) if lax and isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not _bounded(number, info):
        raise _fail(path, info, value)
    return float(number)


def _parse_number(text: str) -> int | float | str:
    for parse in (int, float):
        try:
            return parse(text.strip())
        except ValueError:
            continue
    return text


def _bounded(number: float, info: mi.IntType | mi.FloatType) -> bool:
    return not ((info.gt is not None and not number > info.gt)
                or (info.ge is not None and not number >= info.ge)
                or (info.lt is not None and not number < info.lt)
                or (info.le is not None and not number <= info.le))


def _bool(value: Any, info: mi.BoolType, path: Path, lax: bool) -> bool:
    if isinstance(value, bool):
        return value
    if lax and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _fail(path, info, value)


def _str(value: Any, info: mi.StrType, path: Path, lax: bool) -> str:
    if not isinstance(value, str):
        raise _fail(path, info, value)
    _check_length(len(value), info, path, value)
    if info.pattern is not None and not re.search(info.pattern, value):
        raise _fail(path, info, value)
    return value


_SCALARS: dict[type, Any] = {
    mi.IntType: _int, mi.FloatType: _float, mi.BoolType: _bool, mi.StrType: _str,
}


# --- words ---------------------------------------------------------------------------------


def describe(info: mi.Type) -> str:
    """What a value must be, in words: "an integer >= 1 and <= 64", "a string or null"."""
    if isinstance(info, mi.UnionType):
        return " or ".join(describe(m) for m in info.types)
    if isinstance(info, mi.IntType):
        return _with("an integer", _bounds(info))
    if isinstance(info, mi.FloatType):
        return _with("a number", _bounds(info))
    if isinstance(info, mi.StrType):
        limits = _lengths(info, "character")
        if info.pattern is not None:
            limits.append(f"matching {info.pattern}")
        return _with("a string", limits)
    if isinstance(info, (mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType)):
        return _with("a list", _lengths(info, "item"))
    if isinstance(info, mi.TupleType):
        return f"a list of {len(info.item_types)} items"
    if isinstance(info, (mi.DictType, mi.StructType)):
        return "a mapping"
    if isinstance(info, mi.LiteralType):
        return "one of " + ", ".join(repr(v) for v in info.values)
    return _WORDS.get(type(info), "a valid value")


_WORDS: dict[type, str] = {mi.BoolType: "true or false", mi.NoneType: "null",
                           mi.AnyType: "any value"}


def _with(noun: str, limits: list[str]) -> str:
    return f"{noun} {' and '.join(limits)}" if limits else noun


def _bounds(info: mi.IntType | mi.FloatType) -> list[str]:
    out = [f"{op} {bound}" for op, bound in
           ((">", info.gt), (">=", info.ge), ("<", info.lt), ("<=", info.le)) if bound is not None]
    if isinstance(info, mi.IntType) and info.multiple_of is not None:
        out.append(f"a multiple of {info.multiple_of}")
    return out


def _lengths(info: Any, unit: str) -> list[str]:
    out = []
    if info.min_length is not None:
        out.append(f"of at least {info.min_length} {unit}(s)")
    if info.max_length is not None:
        out.append(f"of at most {info.max_length} {unit}(s)")
    return out


def _shown(value: Any) -> str:
    """A value as a message repeats it: short, and kinds rather than whole containers."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, str) and len(value) > _SHOWN_CHARS:
        return repr(value[:_SHOWN_CHARS]) + "..."
    return repr(value)
