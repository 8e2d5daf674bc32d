"""Device labels and the selectors that pick a group of devices by them.

A selector is `site=berlin,tier!=canary,gpu,!decommissioned`: every part must hold.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from edgeinfer.fleet.registry.errors import RegistryError

# Label keys and values end up in selectors (`key=value,key!=value`): no separators.
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists"
    value: str = ""

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "=":
            return labels.get(self.key) == self.value
        return labels.get(self.key) != self.value


@dataclass(frozen=True)
class Selector:
    """A group of devices: `site=berlin,tier!=canary,gpu,!decommissioned` (all must hold)."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        parts = []
        for r in self.requirements:
            if r.op == "exists":
                parts.append(r.key)
            elif r.op == "!exists":
                parts.append(f"!{r.key}")
            else:
                parts.append(f"{r.key}{r.op}{r.value}")
        return ",".join(parts)


def parse_selector(text: str) -> Selector:
    """Raises RegistryError naming the part that is not `key`, `!key`, `key=v` or `key!=v`."""
    reqs: list[Requirement] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        if "!=" in part:
            key, value = part.split("!=", 1)
            op = "!="
        elif "=" in part:
            key, value = part.split("=", 1)
            op = "="
        elif part.startswith("!"):
            key, value, op = part[1:], "", "!exists"
        else:
            key, value, op = part, "", "exists"
        key, value = key.strip(), value.strip()
        check_label(key, value, where=f"selector part {part!r}")
        reqs.append(Requirement(key, op, value))
    return Selector(tuple(reqs))


def check_label(key: str, value: str, where: str = "label") -> None:
    if not LABEL_KEY_RE.match(key):
        raise RegistryError(f"{where}: key {key!r} must match {LABEL_KEY_RE.pattern}")
    if not LABEL_VALUE_RE.match(value):
        raise RegistryError(f"{where}: value {value!r} must match {LABEL_VALUE_RE.pattern}")
