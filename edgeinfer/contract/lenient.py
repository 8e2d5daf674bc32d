"""Reading another program's JSON into a Struct while keeping whatever of it fits.

Agents and the fleet are upgraded separately, so a document may come from an older agent
(keys missing), a newer one (keys we do not know) or a hand-made or buggy one (a field of
the wrong type). `decode` keeps what it can: unknown keys are ignored, a missing key takes
the field's default, and a value of the wrong type is dropped (its field defaulted) instead
of the whole document being lost. A nested Struct, or an entry of a list or dict of
Structs, is read the same way; one that lacks a field without a default (a model entry
without a name) is dropped on its own.

Most documents fit: they are decoded by msgspec in one typed pass, and only a document that
does not fit is walked field by field here.
"""

from __future__ import annotations

import types
import typing
from typing import Any, TypeVar

import msgspec

S = TypeVar("S", bound=msgspec.Struct)


class _Dropped:
    """A value that did not fit its field (the field takes its default)."""


_DROPPED = _Dropped()


def decode(payload: bytes | str, cls: type[S]) -> S | None:
    """`payload` (JSON) as a `cls`, or None when it is not a JSON object (or lacks a field
    that has no default); see the module docstring for what is kept."""
    try:
        return msgspec.json.decode(payload, type=cls)
    except msgspec.ValidationError:
        pass  # JSON, but not all of it fits: keep what does, below
    except msgspec.DecodeError:
        return None
    try:
        data = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return None
    return convert(data, cls)


def convert(data: Any, cls: type[S]) -> S | None:
    """Decoded JSON (`data`) as a `cls`, as `decode` reads it; None when `data` is no
    object or lacks a field that has no default."""
    value = _struct(data, cls)
    return None if isinstance(value, _Dropped) else value


def _struct(data: Any, cls: type[S]) -> S | _Dropped:
    if not isinstance(data, dict):
        return _DROPPED
    kept: dict[str, Any] = {}
    for f in msgspec.structs.fields(cls):
        if f.encode_name in data:
            value = _fit(data[f.encode_name], f.type)
            if not isinstance(value, _Dropped):
                kept[f.name] = value
                continue
        if f.required:
            return _DROPPED
    return cls(**kept)


def _fit(value: Any, hint: Any) -> Any:
    """`value` as the type `hint`, or _DROPPED. Structs (also inside lists, dicts and
    unions) are read leniently; any other type must fit as a whole."""
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        return _struct(value, hint)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _fit_union(value, args)
    if origin is list and args and _holds_struct(args[0]):
        if not isinstance(value, list):
            return _DROPPED
        items = (_fit(item, args[0]) for item in value)
        return [item for item in items if not isinstance(item, _Dropped)]
    if origin is dict and len(args) == 2 and _holds_struct(args[1]):
        if not isinstance(value, dict):
            return _DROPPED
        entries = ((key, _fit(item, args[1])) for key, item in value.items())
        return {key: item for key, item in entries if not isinstance(item, _Dropped)}
    try:
        return msgspec.convert(value, hint)
    except msgspec.ValidationError:
        return _DROPPED


def _fit_union(value: Any, members: tuple[Any, ...]) -> Any:
    if value is None:
        return None if type(None) in members else _DROPPED
    plain = [m for m in members if m is not msgspec.UnsetType and not _holds_struct(m)]
    if plain:
        try:
            return msgspec.convert(value, typing.Union[tuple(plain)])  # noqa: UP007
        except msgspec.ValidationError:
            pass
    for member in members:
        if _holds_struct(member):
            fitted = _fit(value, member)
            if not isinstance(fitted, _Dropped):
                return fitted
    return _DROPPED


def _holds_struct(hint: Any) -> bool:
    """Whether `hint` is a Struct or a list, dict or union with one inside."""
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        return True
    return any(_holds_struct(arg) for arg in typing.get_args(hint))
