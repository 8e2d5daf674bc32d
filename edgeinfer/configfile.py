"""Reading a YAML config into a Struct: shared by the agent's config and the fleet's.

One reader, so both sides refuse the same things in the same words: a key given twice
(PyYAML would silently keep the last), an unknown or ill-typed key (named by its path,
edgeinfer/structcheck.py), and environment variables that override keys
(`<PREFIX>BROKER__URL`: double underscore for nesting). Every error is a `ConfigError`
of one line that names the file.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import yaml

from edgeinfer.structcheck import StructError, convert, wants_text

T = TypeVar("T")


class ConfigError(Exception):
    """One clear line: which file, which key, what is wrong."""


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, first: int, again: int) -> None:
        where = f"on line {first}" if first == again else f"(lines {first} and {again})"
        super().__init__(f"line {again}: key '{key}' is given twice {where}; "
                         "YAML would keep only the last, so one of them is a mistake")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping may not give a key twice."""

    def construct_document(self, node: yaml.Node) -> Any:
        # Where each mapping sits (`broker.tls`), so a key given twice is named in full.
        self._paths: dict[int, str] = {}
        self._note_paths(node, "")
        return super().construct_document(node)

    def _note_paths(self, node: yaml.Node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            if id(node) in self._paths:
                return  # an alias seen before
            self._paths[id(node)] = path
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                self._note_paths(value_node, f"{path}.{name}" if path else str(name))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._note_paths(item, f"{path}[{index}]")

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        parent = getattr(self, "_paths", {}).get(id(node), "")
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then overriding a key of base is meant
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(f"{parent}.{key}" if parent else key, seen[key], line)
                seen[key] = line
            except TypeError:
                continue  # an unhashable key: PyYAML's own error says so below
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The file's top-level mapping ({} for an empty file), or a ConfigError of one line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read config file: {why}") from None
    try:
        loaded = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.reader.ReaderError as exc:
        # Its str() spans lines; say it in one.
        raise ConfigError(f"{path}: not valid YAML: character {exc.character!r} at offset "
                          f"{exc.position} is not allowed in YAML text") from None
    except yaml.MarkedYAMLError as exc:
        where = f"line {exc.problem_mark.line + 1}: " if exc.problem_mark is not None else ""
        raise ConfigError(f"{path}: {where}not valid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return loaded


def check_text(tree: Any, source: str, path: str = "") -> None:
    """Refuse a key or value that is not text a topic, a file name or a host can hold: a
    lone surrogate (a `"\\udcff"` escape in YAML, or an environment variable holding bytes
    that are not UTF-8, which Python decodes to surrogates) or a NUL. Left in, they fail
    far from the config: in the IDNA codec while connecting, or in the MQTT encoder."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            name = f"{path}.{key}" if path else str(key)
            check_text(key, source, path or "(top level)")
            check_text(value, source, name)
    elif isinstance(tree, list):
        for index, item in enumerate(tree):
            check_text(item, source, f"{path}[{index}]")
    elif isinstance(tree, str):
        try:
            tree.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{source}: key '{path}': not valid text (it holds bytes that "
                              "are not UTF-8, or a lone surrogate escape)") from None
        if "\0" in tree:
            raise ConfigError(f"{source}: key '{path}': must not hold a NUL character")


def env_overrides(environ: Mapping[str, str], prefix: str, cls: type[Any], *,
                  skip: Collection[str] = (), only_keys: bool = False) -> dict[str, Any]:
    """`<prefix>BROKER__URL=...` -> {"broker": {"url": "..."}}; values read as YAML scalars.

    `skip`: variables of the prefix that mean something else (the config file's name).
    `only_keys`: leave alone a variable whose first part names no top-level key (the
    prefix is shared with commands' flags); otherwise it is an unknown key, an error.
    """
    top = {f.encode_name for f in msgspec.structs.fields(cls)}
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(prefix) or name in skip:
            continue
        path = [p.lower() for p in name[len(prefix):].split("__")]
        if only_keys and path[0] not in top:
            continue
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment: {name} conflicts with another variable")
        node[path[-1]] = _env_value(raw, cls, path)
    return tree


def _env_value(raw: str, cls: type[Any], path: list[str]) -> Any:
    try:
        value = yaml.safe_load(raw) if raw else raw
    except yaml.YAMLError:
        return raw
    # Ids, names and URLs stay strings even when they look like numbers or booleans.
    if isinstance(value, (bool, int, float)) and wants_text(cls, path):
        return raw
    return value


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` laid onto `base`, mapping by mapping."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def to_struct(data: Mapping[str, Any], cls: type[T], source: str) -> T:
    """The config as `cls`; an unknown or ill-typed key is a ConfigError naming it and `source`.

    Lax (edgeinfer/structcheck.py): YAML and the environment write "4" for 4 at times.
    """
    check_text(data, source)
    try:
        return convert(dict(data), cls, lax=True)
    except StructError as exc:
        raise ConfigError(f"{source}: {exc}") from None
